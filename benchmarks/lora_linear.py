"""One LoRA layer, forward and forward+backward: minilora's LoRALinear, peft's lora.Linear, nn.Linear.

    .venv/bin/python -m benchmarks lora_linear            # through the runner (table, JSON, PNG)
    .venv/bin/python benchmarks/lora_linear.py [--quick] [--repeats N]

The layer: in = out = 4096 features, 4096 tokens (x is 4096 x 4096), r in {8, 16, 64},
alpha = 2r, no dropout; fp32 on the CPU, bf16 on a GPU (both LoRA stacks keep their
adapters in fp32 over a bf16 base, their default). Every stack computes over the very
same weight W and bias:

    nn.Linear (frozen)     y = x W^T + b with W frozen and x requiring grad, so backward
                           computes dx only. The fair baseline for a frozen base plus an
                           adapter: dx is work a LoRA layer inside a network must do too.
    nn.Linear (trainable)  W requires grad as well: backward also computes dW, one more
                           big matmul (what training the full layer costs).
    minilora               LoRALinear(base, r, alpha): backward computes dx, dA, dB.
    peft                   peft's lora.Linear, built by get_peft_model: dx, dA, dB.

One timed call = forward, then backward of the output against a fixed random
gradient; "fwd" is the forward part (with autograd recording: the training forward)
and "fwd+bwd" the whole call, both read from one call (CUDA events on a GPU,
perf_counter on the CPU). Grads are set to None before every call, outside the timing.

Before anything is timed, the warm-up call's output y and gradients dx, dA, dB of
minilora and peft (given the same non-zero A and B) must agree, to 1e-5 relative in
fp32 and 2e-2 in bf16, or the suite stops with StacksDisagree. Then `repeats` rounds
in which every stack runs once, the order rotating every round (A,B,C / B,C,A / ...),
so machine drift hits all of them alike; medians are reported, and the ratios are
those medians divided, all from the same run. The nn.Linear rows do not depend on r:
they run once per round, beside every r.

Goal (printed, never asserted): minilora's fwd+bwd within 1.15x the frozen nn.Linear's
at r = 16, and no slower than peft's.
"""

from __future__ import annotations

import argparse
import json
import statistics

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from . import common
except ImportError:
    import common

FULL = {"features": 4096, "tokens": 4096, "ranks": (8, 16, 64)}
QUICK = {"features": 256, "tokens": 256, "ranks": (8, 16, 64)}
REPEATS = {"cpu": (1, 3), "cuda": (10, 50)}  # (warm-up rounds, timed rounds) per device type
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
GOAL_VS_LINEAR, GOAL_R = 1.15, 16
FROZEN, TRAINABLE = "nn.Linear (frozen)", "nn.Linear (trainable)"


def make_minilora_layer(base, r: int, alpha: float):
    from minilora.lora.layer import LoRALinear

    return LoRALinear(base, r=r, alpha=alpha)


def make_peft_layer(base, r: int, alpha: float):
    """peft's lora.Linear as get_peft_model builds it (adapter dtype and device included)."""
    import peft
    from torch import nn

    holder = nn.Module()
    holder.layer = base
    model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                        target_modules=["layer"]))
    return model.base_model.model.layer


def _adapter(layer):
    """(A, B) weights of either LoRA layer."""
    from torch import nn

    if isinstance(layer.lora_A, nn.ModuleDict):  # peft: one entry per adapter name
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return layer.lora_A.weight, layer.lora_B.weight


def _step(layer, x, grad, params):
    """One timed call: forward | backward; returns what the correctness check compares."""

    def call(clock: common.Clock):
        x.grad = None
        for p in params:
            p.grad = None
        clock.start()
        y = layer(x)
        clock.mark()
        y.backward(grad)
        clock.mark()
        return y.detach(), x.grad, *[p.grad for p in params]

    return call


def check_agree(outputs: dict, ranks, tol: float) -> dict:
    """minilora's y, dx, dA, dB against peft's at every r; StacksDisagree names the first mismatch."""
    found = {}
    for r in ranks:
        ours, theirs = outputs[f"minilora r={r}"], outputs[f"peft r={r}"]
        for name, a, b in zip(("y", "dx", "dA", "dB"), ours, theirs):
            found[f"r={r} {name}"] = common.assert_close(f"lora_linear r={r}: minilora vs peft, {name}", a, b, tol)
    return found


def run(quick: bool = False, repeats: int | None = None, warmup: int | None = None, device=None,
        log=print) -> dict:
    """Measure; returns the suite's record (settings, rows, ratios, check, goal)."""
    import torch
    from torch import nn

    common.import_bitsandbytes()  # peft imports it: make sure it did not take kernels/ for PyPI's `kernels`
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    size = QUICK if quick else FULL
    n, tokens, ranks = size["features"], size["tokens"], size["ranks"]
    default_warmup, default_repeats = REPEATS["cuda" if device.type == "cuda" else "cpu"]
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeats if repeats is None else repeats

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(n, n, dtype=torch.float32)  # default init, then cast: same W for every stack
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, n, generator=g) / n**0.5)
        base.bias.copy_(torch.randn(n, generator=g) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    trainable = nn.Linear(n, n, device=device, dtype=dtype)
    with torch.no_grad():
        trainable.weight.copy_(base.weight)
        trainable.bias.copy_(base.bias)
    x = torch.randn(tokens, n, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(tokens, n, generator=g).to(device=device, dtype=dtype)

    calls = {FROZEN: _step(base, x, grad, []),
             TRAINABLE: _step(trainable, x, grad, [trainable.weight, trainable.bias])}
    for r in ranks:
        ours, theirs = make_minilora_layer(base, r, 2 * r), make_peft_layer(base, r, 2 * r)
        a, b = _adapter(ours)
        with torch.no_grad():  # non-zero B: a fresh B = 0 would hide B's half of the math
            b.copy_(torch.randn(b.shape, generator=g).to(b) / r**0.5)
            for mine, peft_w in zip((a, b), _adapter(theirs)):
                peft_w.copy_(mine)
        calls[f"minilora r={r}"] = _step(ours, x, grad, list(_adapter(ours)))
        calls[f"peft r={r}"] = _step(theirs, x, grad, list(_adapter(theirs)))

    check = {}

    def on_warmup(outputs):
        check.update(check_agree(outputs, ranks, TOLERANCE[dtype_name]))
        log(f"lora_linear: minilora and peft agree (y, dx, dA, dB) at r = {', '.join(map(str, ranks))}; "
            f"largest relative difference {max(check.values()):.2g} (tolerance {TOLERANCE[dtype_name]:g})")

    log(f"lora_linear: {n} x {n}, {tokens} tokens, {dtype_name} on {device.type}; {warmup} warm-up round(s), "
        f"{repeats} timed rounds of {len(calls)} stacks")
    times = common.time_interleaved(calls, repeats, device, warmup=warmup, on_warmup=on_warmup)

    rows = []
    for name, segments in times.items():
        fwd = [s[0] * 1e3 for s in segments]
        fwdbwd = [(s[0] + s[1]) * 1e3 for s in segments]
        stack, _, r = name.partition(" r=")
        rows.append({"stack": stack, "r": int(r) if r else None, "fwd_ms": statistics.median(fwd),
                     "fwd_bwd_ms": statistics.median(fwdbwd), "fwd_ms_all": fwd, "fwd_bwd_ms_all": fwdbwd})
    frozen = next(row for row in rows if row["stack"] == FROZEN)
    peft_at = {row["r"]: row for row in rows if row["stack"] == "peft"}
    for row in rows:
        row["fwd_vs_linear"] = row["fwd_ms"] / frozen["fwd_ms"]
        row["fwd_bwd_vs_linear"] = row["fwd_bwd_ms"] / frozen["fwd_bwd_ms"]
        if row["stack"] == "minilora":
            row["fwd_vs_peft"] = row["fwd_ms"] / peft_at[row["r"]]["fwd_ms"]
            row["fwd_bwd_vs_peft"] = row["fwd_bwd_ms"] / peft_at[row["r"]]["fwd_bwd_ms"]

    goal_r = GOAL_R if GOAL_R in ranks else ranks[len(ranks) // 2]
    ours = next(row for row in rows if row["stack"] == "minilora" and row["r"] == goal_r)
    goal = {"r": goal_r, "fwd_bwd_vs_linear": ours["fwd_bwd_vs_linear"], "limit_vs_linear": GOAL_VS_LINEAR,
            "fwd_bwd_vs_peft": ours["fwd_bwd_vs_peft"],
            "meets_vs_linear": ours["fwd_bwd_vs_linear"] <= GOAL_VS_LINEAR,
            "meets_vs_peft": ours["fwd_bwd_vs_peft"] <= 1.0}
    return {
        "suite": "lora_linear",
        "settings": {"features": n, "tokens": tokens, "ranks": list(ranks), "alpha": "2r", "dropout": 0.0,
                     "dtype": dtype_name, "device": device.type, "warmup_rounds": warmup, "repeats": repeats,
                     "quick": quick},
        "timing": ("one call = forward then backward against a fixed gradient; fwd and fwd+bwd read from the "
                   "same call (CUDA events on GPU, perf_counter on CPU); stacks interleaved, order rotating "
                   "every round; medians"),
        "baselines": {FROZEN: "W frozen, x requires grad: backward computes dx only",
                      TRAINABLE: "W and b require grad: backward computes dx, dW, db"},
        "check": {"tolerance": TOLERANCE[dtype_name], "relative_differences": check, "ok": True},
        "results": rows,
        "goal": goal,
    }


COLUMNS = [("label", "stack", "s"), ("r", "r", "d"), ("fwd_ms", "fwd ms", ".2f"), ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
           ("fwd_vs_linear", "fwd ÷ frozen nn.Linear", ".3f"),
           ("fwd_bwd_vs_linear", "fwd+bwd ÷ frozen nn.Linear", ".3f"),
           ("fwd_bwd_vs_peft", "fwd+bwd ÷ peft", ".3f")]


def _labelled(rows):
    labels = {FROZEN: "nn.Linear, frozen W (dx only)", TRAINABLE: "nn.Linear, trainable W (dx, dW)",
              "minilora": "minilora LoRALinear", "peft": "peft lora.Linear"}
    return [{**row, "label": labels[row["stack"]]} for row in rows]


def summary_lines(record: dict) -> list[str]:
    s, goal = record["settings"], record["goal"]
    return [
        f"{s['features']} x {s['features']} layer, {s['tokens']} tokens, {s['dtype']} on {s['device']}, alpha = 2r, "
        f"no dropout; medians of {s['repeats']} interleaved rounds after {s['warmup_rounds']} warm-up round(s); "
        "fwd = forward with autograd recording, fwd+bwd = forward + backward of the same call. "
        "minilora and peft checked equal (y, dx, dA, dB) before timing.",
        f"Goal at r = {goal['r']}: minilora fwd+bwd {goal['fwd_bwd_vs_linear']:.3f}x frozen nn.Linear "
        f"(<= {goal['limit_vs_linear']}x: {'meets' if goal['meets_vs_linear'] else 'MISSES'}), "
        f"{goal['fwd_bwd_vs_peft']:.3f}x peft (<= 1: {'meets' if goal['meets_vs_peft'] else 'MISSES'}).",
    ]


def markdown(record: dict) -> str:
    return common.markdown_table(_labelled(record["results"]), COLUMNS) + "\n\n" + "\n".join(summary_lines(record))


def print_report(record: dict) -> None:
    common.print_table(_labelled(record["results"]), COLUMNS)
    for line in summary_lines(record):
        print(line)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK['features']} features, {QUICK['tokens']} tokens")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 3 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 1 on CPU, 10 on GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the record as JSON too")
    args = p.parse_args(argv)
    record = run(args.quick, args.repeats, args.warmup, args.device)
    print_report(record)
    if args.json:
        print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
