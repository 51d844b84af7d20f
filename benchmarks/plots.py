"""One PNG per benchmark suite, drawn from the suite's record (matplotlib, the `bench` extra).

Each function takes the record a suite returned and the path to write; the runner
calls `plot(name, record, path)`. Every figure is grouped bars: one group per case
(an r, a shape, a dtype), one bar per stack, so the stacks compared sit side by side.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise


def grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str, title: str, log: bool = False):
    """Bars of `series` (name -> one value per group; None leaves a gap), labelled with their values."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                      width, label=name)
        ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def lora_linear(record: dict, path: Path) -> None:
    plt = _pyplot()
    rows, s = record["results"], record["settings"]
    ranks = s["ranks"]
    by = {(row["stack"], row["r"]): row for row in rows}
    frozen = next(row for row in rows if row["r"] is None and "frozen" in row["stack"])
    trainable = next(row for row in rows if row["r"] is None and "trainable" in row["stack"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwd_bwd_ms", "forward + backward")):
        grouped_bars(ax, [f"r = {r}" for r in ranks],
                     {stack: [by[(stack, r)][key] for r in ranks] for stack in ("minilora", "peft")}, "ms (median)",
                     f"{title}: {s['features']}x{s['features']}, {s['tokens']} tokens, {s['dtype']} on {s['device']}")
        ax.axhline(frozen[key], color="black", lw=1, label="nn.Linear, frozen W")
        if key == "fwd_bwd_ms":
            ax.axhline(trainable[key], color="gray", lw=1, ls="--", label="nn.Linear, trainable W")
        ax.legend(fontsize=7, loc="lower right")
    _save(plt, fig, path)


def nf4(record: dict, path: Path) -> None:
    plt = _pyplot()
    rows = record["results"]
    panels = 2 if record.get("linear") else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    cases = list(dict.fromkeys(f"{r['op']}\n{'x'.join(map(str, r['shape']))} {r['dtype']}" for r in rows))
    stacks = sorted(dict.fromkeys(r["stack"] for r in rows), key=lambda st: st == "bitsandbytes")  # peer last
    value = {(f"{r['op']}\n{'x'.join(map(str, r['shape']))} {r['dtype']}", r["stack"]): r["gb_per_s"] for r in rows}
    grouped_bars(axes[0][0], cases, {st: [value.get((c, st)) for c in cases] for st in stacks},
                 "GB/s (bytes read + written / median time)", "NF4 quantize / dequantize")
    if panels == 2:
        lin = record["linear"]
        cases = list(dict.fromkeys(f"{r['dtype']}, {r['tokens']} token(s)" for r in lin))
        stacks = list(dict.fromkeys(r["stack"] for r in lin))
        value = {(f"{r['dtype']}, {r['tokens']} token(s)", r["stack"]): r["seconds"] * 1e3 for r in lin}
        shape = "x".join(map(str, record["settings"]["linear_shape"]))
        grouped_bars(axes[0][1], cases, {st: [value.get((c, st)) for c in cases] for st in stacks},
                     "ms (median, log scale)", f"layer forward, {shape} NF4 weight", log=True)
    _save(plt, fig, path)


def train_step(record: dict, path: Path) -> None:
    plt = _pyplot()
    rows = record["results"]
    family = {"minilora": "minilora", "minilora-nf4": "minilora", "hf": "transformers + peft",
              "hf-bnb4": "transformers + peft"}

    def case(r):
        base = "NF4 base" if r["stack"] in ("minilora-nf4", "hf-bnb4") else "fp32 base"
        return f"{base}\ncheckpointing {r['checkpointing']}"

    cases = list(dict.fromkeys(case(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens / s (median step)"), (axes[1], "peak_rss_mb", "peak RSS MB")):
        value = {(case(r), family[r["stack"]]): r[key] for r in rows}
        grouped_bars(ax, cases, {f: [value.get((c, f)) for c in cases] for f in dict.fromkeys(family.values())},
                     label, f"SmolLM2-135M LoRA step, {record['settings']['batch_size']} x "
                            f"{record['settings']['seq_len']} tokens")
    _save(plt, fig, path)


def load(record: dict, path: Path) -> None:
    plt = _pyplot()
    rows = record["results"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    stacks = list(dict.fromkeys(r["stack"] for r in rows))
    value = {(r["dtype"], r["stack"]): r["peak_above_baseline_bytes"] / 2**20 for r in rows}
    weights = {r["dtype"]: r["weights_bytes"] / 2**20 for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    grouped_bars(ax, dtypes, {st: [value.get((d, st)) for d in dtypes] for st in stacks},
                 "peak RSS above baseline, MB", "loading SmolLM2-135M (weights: black ticks)")
    ax.scatter(range(len(dtypes)), [weights[d] for d in dtypes], marker="_", s=900, color="black", zorder=3)
    _save(plt, fig, path)


PLOTS = {"lora_linear": lora_linear, "nf4": nf4, "train_step": train_step, "load": load}


def plot(suite: str, record: dict, path: Path) -> Path:
    PLOTS[suite](record, path)
    return path
