"""NF4 quantize / dequantize throughput: minilora (torch, Triton) against bitsandbytes.

    python -m benchmarks.bench_nf4 [--reps 5] [--big-reps 3] [--dtypes bfloat16,float32] [--threads N]
    python benchmarks/bench_nf4.py

For each weight shape and dtype every stack is first checked to give the same
bytes / values as bitsandbytes, then timed: one warm-up call each, then `reps`
rounds in which the stacks take turns (the order rotates every round) so that a
noisy neighbour or a thermal drift hits all of them alike. Reported: the median
time, the throughput in GB/s of bytes read + written, and ms per million values.
Results go to benchmarks/results/nf4-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from . import common
except ImportError:
    import common

ROOT = Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed rounds for 4096x4096")
    p.add_argument("--big-reps", type=int, default=3, help="timed rounds for 4096x14336")
    p.add_argument("--dtypes", default="bfloat16,float32", help="weight / output dtypes, comma separated")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and bitsandbytes' OpenMP")
    p.add_argument("--shapes", default="4096x4096,4096x14336", help="the first gets --reps, the others --big-reps")
    p.add_argument("--no-double-quant", action="store_true", help="fp32 absmax instead of double quantization")
    return p.parse_args()


args = parse_args()
if args.threads:  # must precede the first import of torch / bitsandbytes to reach OpenMP
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402

from minilora.nf4 import NF4Weight, dequantize_nf4_torch, quantize_nf4  # noqa: E402

try:
    import triton

    from minilora.kernels.nf4_dequant import dequantize_nf4_triton
except ImportError:  # pragma: no cover - no Triton on this platform
    triton = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{common.cpu_model()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def stats_bytes(w: NF4Weight) -> int:
    return w.nbytes - w.packed.numel()


def to_bnb(w: NF4Weight):
    """The same quantized bytes as a bitsandbytes (packed, QuantState) pair."""
    sd = w.to_bnb_state_dict("w")
    qs = bnbF.QuantState.from_dict({k[2:]: v for k, v in sd.items() if k != "w"}, device=w.device)
    return sd["w"], qs


def check_quantize(ours: NF4Weight, packed, state, strict: bool) -> bool:
    same = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    if ours.double_quant:
        same = same and torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset)
    if strict and not same:
        raise SystemExit("minilora's quantization differs from bitsandbytes' on the CPU: refusing to time it")
    return same


def time_round_robin(stacks: dict, reps: int, device) -> dict:
    for fn in stacks.values():  # warm-up: allocator, caches, Triton compilation
        fn()
    sync(device)
    times = {name: [] for name in stacks}
    names = list(stacks)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            stacks[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_shape(shape, dtype, reps, device, double_quant) -> list[dict]:
    n = shape[0] * shape[1]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype).to(device)
    ours = quantize_nf4(w, 64, double_quant)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    identical = check_quantize(ours, packed, state, strict=device.type == "cpu")
    rows = []
    q_bytes = n * w.element_size() + ours.nbytes
    times = time_round_robin(
        {
            "minilora-torch": lambda: quantize_nf4(w, 64, double_quant),
            "bitsandbytes": lambda: bnbF.quantize_4bit(
                w, blocksize=64, quant_type="nf4", compress_statistics=double_quant
            ),
        },
        reps,
        device,
    )
    rows += [dict(op="quantize", stack=k, seconds=v, bytes=q_bytes, identical_to_bnb=identical)
             for k, v in times.items()]  # fmt: skip

    # Dequantize the very same bytes in every stack, so the outputs must agree bit for bit.
    b_packed, b_state = to_bnb(ours)
    want = bnbF.dequantize_4bit(b_packed, b_state)
    stacks = {"minilora-torch": lambda: dequantize_nf4_torch(ours, dtype)}
    out = torch.empty(shape, dtype=dtype, device=device)
    stacks["minilora-torch (out=)"] = lambda: dequantize_nf4_torch(ours, dtype, out=out)
    if device.type == "cuda" and triton is not None:
        stacks["minilora-triton"] = lambda: dequantize_nf4_triton(ours, dtype)
        stacks["minilora-triton (out=)"] = lambda: dequantize_nf4_triton(ours, dtype, out=out)
    stacks["bitsandbytes"] = lambda: bnbF.dequantize_4bit(b_packed, b_state)
    same = {name: torch.equal(fn(), want) for name, fn in stacks.items()}
    if not all(same.values()):
        raise SystemExit(f"dequantized values differ from bitsandbytes': {same}")
    dq_bytes = ours.packed.numel() + stats_bytes(ours) + n * w.element_size()
    times = time_round_robin(stacks, reps, device)
    rows += [dict(op="dequantize", stack=k, seconds=v, bytes=dq_bytes, identical_to_bnb=True) for k, v in times.items()]
    for r in rows:
        r.update(shape=list(shape), dtype=str(dtype).removeprefix("torch."), values=n)
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["ms_per_million"] = r["seconds"] * 1e3 / (n / 1e6)
    return rows


def main():
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    t_start = time.time()
    for i, shape in enumerate(shapes):
        reps = args.reps if i == 0 else args.big_reps
        for dtype in dtypes:
            rows += bench_shape(shape, dtype, reps, device, not args.no_double_quant)
    print_table(rows)
    record = {
        "benchmark": "nf4",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": command_line(),
        "device": f"{device.type}: {device_name(device)}",
        "double_quant": not args.no_double_quant,
        "blocksize": 64,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None),
            "bitsandbytes": bitsandbytes.__version__,
        },
        "timing": "median of interleaved rounds after one warm-up call per stack",
        "wall_seconds": round(time.time() - t_start, 1),
        "results": rows,
    }
    out = ROOT / "results" / f"nf4-{socket.gethostname()}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['device']}\nwrote {out.relative_to(ROOT.parent)}")


def command_line() -> str:
    how = f"-m {__spec__.name}" if __spec__ is not None else os.path.relpath(sys.argv[0], ROOT.parent)
    return " ".join(["python", how] + sys.argv[1:])


def print_table(rows):
    header = f"{'op':<11}{'shape':<12}{'dtype':<10}{'stack':<24}{'median ms':>10}{'GB/s':>8}{'ms/1M':>8}{'vs bnb':>8}"
    print(header + "\n" + "-" * len(header))
    base = {(r["op"], tuple(r["shape"]), r["dtype"]): r["seconds"] for r in rows if r["stack"] == "bitsandbytes"}
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        speedup = base[(r["op"], tuple(r["shape"]), r["dtype"])] / r["seconds"]
        print(
            f"{r['op']:<11}{shape:<12}{r['dtype']:<10}{r['stack']:<24}{r['seconds'] * 1e3:>10.1f}"
            f"{r['gb_per_s']:>8.2f}{r['ms_per_million']:>8.2f}{speedup:>7.2f}x"
        )


if __name__ == "__main__":
    main()
