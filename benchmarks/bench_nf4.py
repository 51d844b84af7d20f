"""NF4 quantize / dequantize throughput and NF4Linear's forward: minilora (reference, fast, Triton) vs bitsandbytes.

    python benchmarks/bench_nf4.py [--reps 5] [--big-reps 3] [--dtypes bfloat16,float32] [--threads N]
    python -m benchmarks nf4            # through the runner (one JSON with every suite, table, PNG)

For each weight shape and dtype every stack is first checked to give the same
bytes / values as bitsandbytes, then timed: one warm-up call each, then `reps`
rounds in which the stacks take turns (the order rotates every round) so that a
noisy neighbour or a thermal drift hits all of them alike. Reported: the median
time, the throughput in GB/s of bytes read + written, and ms per million values.
The minilora stacks are the plain reference codec (minilora.qlora.nf4) and the fast
CPU codec (minilora.fast.nf4_codec), timed in the same rounds; a second table gives
fast against reference, the speed the fast codec has to earn its place with.

Then one layer's forward: minilora's NF4Linear (on the fast codec) against
bitsandbytes' Linear4bit over the very same quantized bytes (4096 x 4096 with bias,
eval mode, no grad), for 1 token and 256 tokens, compute dtype = input dtype. On a CPU with AVX512-BF16 bitsandbytes
repacks the weight on its first eval forward and runs a fused 4-bit kernel in bf16
(also for fp32 inputs); minilora dequantizes into a reused buffer and calls F.linear.
Outputs are checked to agree within 2e-2 of their largest value (bf16 rounding) before
timing. `run()` is what the runner calls; this script writes
benchmarks/results/nf4-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

try:  # run as a script (python benchmarks/x.py) or imported as benchmarks.x
    from . import common
except ImportError:
    import common

ROOT = Path(__file__).resolve().parent
SHAPES = ((4096, 4096), (4096, 14336))
LINEAR_SHAPE, LINEAR_TOKENS, LINEAR_TOL = (4096, 4096), (1, 256), 2e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed rounds for 4096x4096 (and the layer forward)")
    p.add_argument("--big-reps", type=int, default=3, help="timed rounds for 4096x14336")
    p.add_argument("--dtypes", default="bfloat16,float32", help="weight / output dtypes, comma separated")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and bitsandbytes' OpenMP")
    p.add_argument("--shapes", default="4096x4096,4096x14336", help="the first gets --reps, the others --big-reps")
    p.add_argument("--no-double-quant", action="store_true", help="fp32 absmax instead of double quantization")
    p.add_argument("--no-linear", action="store_true", help="skip NF4Linear vs Linear4bit forward")
    return p.parse_args(argv)


if __name__ == "__main__":  # OMP_NUM_THREADS must be set before torch / bitsandbytes start OpenMP
    _threads = parse_args().threads
    if _threads:
        os.environ["OMP_NUM_THREADS"] = str(_threads)

bitsandbytes = common.import_bitsandbytes()
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from minilora.fast import nf4_codec  # noqa: E402
from minilora.qlora import nf4  # noqa: E402
from minilora.qlora.nf4 import NF4Weight, quantize_nf4  # noqa: E402
from minilora.qlora.nf4_linear import NF4Linear  # noqa: E402

try:
    import triton

    from minilora.kernels.nf4_dequant import dequantize_nf4_triton
except ImportError:  # pragma: no cover - no Triton on this platform
    triton = None


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


CODECS = {"minilora-reference": nf4.REFERENCE, "minilora-fast": nf4_codec.CODEC}


def quantize_with(codec, w, double_quant) -> NF4Weight:
    previous = nf4.use_codec(codec)
    try:
        return quantize_nf4(w, 64, double_quant)
    finally:
        nf4.use_codec(previous)


def check_quantize(ours: NF4Weight, packed, state, strict: bool) -> bool:
    same = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    if ours.double_quant:
        same = same and torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset)
    if strict and not same:
        raise common.StacksDisagree("minilora's quantization differs from bitsandbytes' on the CPU: refusing to time it")
    return same


def time_round_robin(stacks: dict, reps: int, device) -> dict:
    """Median seconds per stack: one warm-up call each, then `reps` rotating rounds."""
    times = common.time_interleaved({name: common.whole(fn) for name, fn in stacks.items()}, reps, device)
    return {name: common.median(t[0] for t in ts) for name, ts in times.items()}


def bench_shape(shape, dtype, reps, device, double_quant) -> list[dict]:
    n = shape[0] * shape[1]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    identical = {name: check_quantize(quantize_with(codec, w, double_quant), packed, state, device.type == "cpu")
                 for name, codec in CODECS.items()}  # fmt: skip
    ours = quantize_with(nf4.REFERENCE, w, double_quant)
    rows = []
    q_bytes = n * w.element_size() + ours.nbytes
    stacks = {name: (lambda c=codec: quantize_with(c, w, double_quant)) for name, codec in CODECS.items()}
    stacks["bitsandbytes"] = lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                        compress_statistics=double_quant)  # fmt: skip
    times = time_round_robin(stacks, reps, device)
    rows += [dict(op="quantize", stack=k, seconds=v, bytes=q_bytes, identical_to_bnb=identical.get(k, True))
             for k, v in times.items()]  # fmt: skip

    # Dequantize the very same bytes in every stack, so the outputs must agree bit for bit.
    b_packed, b_state = to_bnb(ours)
    want = bnbF.dequantize_4bit(b_packed, b_state)
    out = torch.empty(shape, dtype=dtype, device=device)
    stacks = {}
    for name, codec in CODECS.items():  # the codecs' own decoders, also on CUDA (where nf4 would pick Triton)
        stacks[name] = lambda c=codec: c.dequantize(ours, dtype)
        stacks[f"{name} (out=)"] = lambda c=codec: c.dequantize(ours, dtype, out=out)
    if device.type == "cuda" and triton is not None:
        stacks["minilora-triton"] = lambda: dequantize_nf4_triton(ours, dtype)
        stacks["minilora-triton (out=)"] = lambda: dequantize_nf4_triton(ours, dtype, out=out)
    stacks["bitsandbytes"] = lambda: bnbF.dequantize_4bit(b_packed, b_state)
    same = {name: torch.equal(fn(), want) for name, fn in stacks.items()}
    if not all(same.values()):
        raise common.StacksDisagree(f"dequantized values differ from bitsandbytes': {same}")
    dq_bytes = ours.packed.numel() + stats_bytes(ours) + n * w.element_size()
    times = time_round_robin(stacks, reps, device)
    rows += [dict(op="dequantize", stack=k, seconds=v, bytes=dq_bytes, identical_to_bnb=True) for k, v in times.items()]
    for r in rows:
        r.update(shape=list(shape), dtype=str(dtype).removeprefix("torch."), values=n)
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["ms_per_million"] = r["seconds"] * 1e3 / (n / 1e6)
    return rows


def fast_vs_reference(rows) -> list[dict]:
    """One row per (op, shape, dtype, fresh or out=): the fast codec's median against the reference's."""
    ms = {(r["op"], tuple(r["shape"]), r["dtype"], r["stack"]): r["seconds"] * 1e3 for r in rows}
    pairs = []
    for (op, shape, dtype, stack), ref_ms in ms.items():
        if not stack.startswith("minilora-reference"):
            continue
        suffix = stack.removeprefix("minilora-reference")
        fast_ms = ms[(op, shape, dtype, "minilora-fast" + suffix)]
        pairs.append(dict(op=op, shape=list(shape), dtype=dtype, output="into out=" if suffix else "fresh",
                          reference_ms=ref_ms, fast_ms=fast_ms, speedup=ref_ms / fast_ms))  # fmt: skip
    return pairs


FAST_COLUMNS = [("op", "op", "s"), ("shape_s", "shape", "s"), ("dtype", "dtype", "s"), ("output", "output", "s"),
                ("reference_ms", "reference ms", ".1f"), ("fast_ms", "fast ms", ".1f"),
                ("speedup", "fast × reference speed", ".2f")]  # fmt: skip


def bnb_linear4bit(weight: torch.Tensor, bias: torch.Tensor, double_quant: bool):
    """bitsandbytes' Linear4bit holding `weight` in NF4 (it quantizes when moved to a device)."""
    out_features, in_features = weight.shape
    layer = bitsandbytes.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=weight.dtype,
                                       compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bitsandbytes.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False, blocksize=64,
                                              compress_statistics=double_quant, quant_type="nf4", module=layer)
    layer.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
    return layer.to(weight.device)


def bench_linear(shape, dtype, tokens, reps, device, double_quant) -> list[dict]:
    """NF4Linear (on the fast codec, as `minilora train` runs it) vs Linear4bit forward over the
    same bytes (eval, no grad): checked, then timed."""
    previous = nf4.use_codec(nf4_codec.CODEC)
    try:
        return _bench_linear(shape, dtype, tokens, reps, device, double_quant)
    finally:
        nf4.use_codec(previous)


def _bench_linear(shape, dtype, tokens, reps, device, double_quant) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=g) * 0.02).to(dtype).to(device)
    bias = (torch.randn(shape[0], generator=g) * 0.02).to(dtype).to(device)
    theirs = bnb_linear4bit(weight, bias, double_quant).eval()
    ours = NF4Linear.from_bnb_state_dict(theirs.state_dict()).eval()  # the very same quantized bytes
    rows = []
    for n_tokens in tokens:
        x = torch.randn(n_tokens, shape[1], generator=g).to(dtype).to(device)
        with torch.no_grad():
            diff = common.assert_close(f"nf4 linear {n_tokens} token(s) {dtype}: NF4Linear vs Linear4bit",
                                       ours(x), theirs(x), LINEAR_TOL)
            times = time_round_robin({"minilora NF4Linear": lambda: ours(x),
                                      "bitsandbytes Linear4bit": lambda: theirs(x)}, reps, device)
        for stack, seconds in times.items():
            rows.append(dict(op="linear forward", stack=stack, seconds=seconds, shape=list(shape), tokens=n_tokens,
                             dtype=str(dtype).removeprefix("torch."), relative_difference=diff))
    base = {(r["tokens"], r["dtype"]): r["seconds"] for r in rows if r["stack"].startswith("bitsandbytes")}
    for r in rows:
        r["speedup_vs_bnb"] = base[(r["tokens"], r["dtype"])] / r["seconds"]
    return rows


def run(reps=5, big_reps=3, dtypes=("bfloat16", "float32"), device=None, shapes=SHAPES, double_quant=True,
        linear=True, linear_shape=LINEAR_SHAPE, linear_tokens=LINEAR_TOKENS, log=print) -> dict:
    """Measure; returns the record this script writes (results: quantize / dequantize rows,
    linear: the layer-forward rows)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, name) if isinstance(name, str) else name for name in dtypes]
    rows, linear_rows = [], []
    t_start = time.time()
    for i, shape in enumerate(shapes):
        n_reps = reps if i == 0 else big_reps
        for dtype in dtypes:
            log(f"nf4: quantize / dequantize {shape[0]}x{shape[1]} {dtype}, {n_reps} rounds")
            rows += bench_shape(tuple(shape), dtype, n_reps, device, double_quant)
    if linear:
        for dtype in dtypes:
            log(f"nf4: NF4Linear vs Linear4bit forward {linear_shape[0]}x{linear_shape[1]} {dtype}, "
                f"{', '.join(map(str, linear_tokens))} token(s), {reps} rounds")
            linear_rows += bench_linear(tuple(linear_shape), dtype, linear_tokens, reps, device, double_quant)
    return {
        "benchmark": "nf4",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": f"{device.type}: {device_name(device)}",
        "double_quant": double_quant,
        "blocksize": 64,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None),
            "bitsandbytes": bitsandbytes.__version__,
        },
        "timing": "median of interleaved rounds after one warm-up call per stack",
        "settings": {"reps": reps, "big_reps": big_reps, "shapes": [list(s) for s in shapes],
                     "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "linear_shape": list(linear_shape),
                     "linear_tokens": list(linear_tokens), "linear_tolerance": LINEAR_TOL},
        "wall_seconds": round(time.time() - t_start, 1),
        "results": rows,
        "fast_vs_reference": fast_vs_reference(rows),
        "linear": linear_rows,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    record = run(args.reps, args.big_reps, args.dtypes.split(","), args.device, shapes, not args.no_double_quant,
                 linear=not args.no_linear)
    record["command"] = command_line()
    print_table(record["results"])
    print()
    common.print_table([{**r, "shape_s": "x".join(map(str, r["shape"]))} for r in record["fast_vs_reference"]],
                       FAST_COLUMNS)
    if record["linear"]:
        print()
        print_linear_table(record["linear"])
    out = ROOT / "results" / f"nf4-{socket.gethostname()}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{record['device']}\nwrote {out.relative_to(ROOT.parent)}")
    return record


def command_line() -> str:
    how = f"-m {__spec__.name}" if __spec__ is not None else os.path.relpath(sys.argv[0], ROOT.parent)
    return " ".join(["python", how] + sys.argv[1:])


def print_table(rows):
    header = f"{'op':<11}{'shape':<12}{'dtype':<10}{'stack':<27}{'median ms':>10}{'GB/s':>8}{'ms/1M':>8}{'vs bnb':>8}"
    print(header + "\n" + "-" * len(header))
    base = {(r["op"], tuple(r["shape"]), r["dtype"]): r["seconds"] for r in rows if r["stack"] == "bitsandbytes"}
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        speedup = base[(r["op"], tuple(r["shape"]), r["dtype"])] / r["seconds"]
        print(
            f"{r['op']:<11}{shape:<12}{r['dtype']:<10}{r['stack']:<27}{r['seconds'] * 1e3:>10.1f}"
            f"{r['gb_per_s']:>8.2f}{r['ms_per_million']:>8.2f}{speedup:>7.2f}x"
        )


LINEAR_COLUMNS = [("stack", "stack", "s"), ("dtype", "dtype", "s"), ("tokens", "tokens", "d"), ("ms", "median ms", ".2f"),
                  ("speedup_vs_bnb", "vs bnb", ".2f")]


def print_linear_table(rows):
    common.print_table([{**r, "ms": r["seconds"] * 1e3} for r in rows], LINEAR_COLUMNS)


def markdown(record: dict) -> str:
    """The runner's tables: quantize / dequantize, then the layer forward."""
    rows = [{**r, "shape_s": "x".join(map(str, r["shape"])), "ms": r["seconds"] * 1e3} for r in record["results"]]
    base = {(r["op"], r["shape_s"], r["dtype"]): r["seconds"] for r in rows if r["stack"] == "bitsandbytes"}
    for r in rows:
        r["speedup_vs_bnb"] = base[(r["op"], r["shape_s"], r["dtype"])] / r["seconds"]
    parts = [common.markdown_table(rows, [("op", "op", "s"), ("shape_s", "shape", "s"), ("dtype", "dtype", "s"),
                                          ("stack", "stack", "s"), ("ms", "median ms", ".1f"),
                                          ("gb_per_s", "GB/s", ".2f"), ("speedup_vs_bnb", "× bnb speed", ".2f")])]
    parts.append("Quantized bytes and dequantized values checked identical to bitsandbytes' before timing; "
                 "GB/s = bytes read + written / median time.")
    if record.get("fast_vs_reference"):
        fast = [{**r, "shape_s": "x".join(map(str, r["shape"]))} for r in record["fast_vs_reference"]]
        parts.append(common.markdown_table(fast, FAST_COLUMNS))
        parts.append("The fast CPU codec (minilora/fast/nf4_codec.py) against the reference (minilora/qlora/nf4.py), "
                     "timed in the same interleaved rounds; both give bitsandbytes' bytes.")
    if record.get("linear"):
        shape = "x".join(map(str, record["settings"]["linear_shape"]))
        parts.append(common.markdown_table([{**r, "ms": r["seconds"] * 1e3} for r in record["linear"]],
                                           LINEAR_COLUMNS[:-1] + [("speedup_vs_bnb", "× bnb speed", ".2f")]))
        worst = max(r["relative_difference"] for r in record["linear"])
        parts.append(f"Layer forward, {shape} NF4 weight with bias, eval mode, no grad, compute dtype = input dtype; "
                     f"outputs agreed within {worst:.2g} of their largest value (tolerance {LINEAR_TOL:g}).")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
