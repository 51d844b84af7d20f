"""Per-process memory of the frozen base under train.distributed = "fsdp", for 1, 2 and 4
CPU processes (gloo), on SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_fsdp_memory.py                 # fp32 base, N = 1, 2, 4
    .venv/bin/python benchmarks/bench_fsdp_memory.py --nf4           # the NF4 base
    .venv/bin/python benchmarks/bench_fsdp_memory.py --model DIR     # another HF folder

Each process loads the model (for N > 1 as `minilora train` does under FSDP: a 16/32-bit
base sharded on the meta device and read shard by shard, an NF4 one quantized a weight at
a time with each process keeping its part), injects LoRA on every projection, frees what it can (gc, malloc_trim)
and reports:

- base_mb: bytes of the base tensors this process holds (its shards), counted;
- rss_mb: resident memory added since just before loading (what the process pays);
- peak_mb: the highest resident memory of the process, loading included.

The table compares rss_mb with 1/N of the single process's and states the fixed
overhead (rss_mb - single/N). JSON to benchmarks/results/.

    .venv/bin/python benchmarks/bench_fsdp_memory.py --placement     # where the adapter lives

times a training step (forward, backward, AdamW; 8 rows of 128 tokens per process) on
2 processes with the adapter replicated (minilora's choice: FSDP ignores it, one
all-reduce of its gradients) and with the adapter sharded by FSDP like the base
(gathered per layer, gradients reduce-scattered), alternating, and reports medians and RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(folder: str, nf4: bool) -> None:
    import torch
    import torch.distributed as dist

    import minilora
    from minilora.train import sharding

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    gc.collect()
    before = rss_mb()
    # As `minilora train` loads under FSDP: each process keeps only its shards.
    model = minilora.load_model(folder, task="causal-lm", dtype=torch.float32, quantize="nf4" if nf4 else None,
                                sharded_by=sharding.shard_on_meta if world > 1 else None)
    minilora.inject(model, minilora.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    if world > 1:
        sharding.shard_model(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back to the OS what sharding freed
    from minilora.qlora.nf4_linear import NF4Linear

    # Unsharded NF4 weights are not parameters (sharding registers their pieces as such).
    held = sum(m.weight.nbytes for m in model.modules() if isinstance(m, NF4Linear) and m._nf4 is not None)
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            held += local.numel() * local.element_size()
    row = {"rank": int(os.environ.get("RANK", "0")), "world": world, "base_mb": held / 2**20,
           "rss_mb": rss_mb() - before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.barrier()
        dist.destroy_process_group()
    if row["rank"] == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def placement_worker(folder: str, steps: int = 6) -> None:
    """Both adapter placements in one process group, steps alternating; rank 0 prints medians."""
    import statistics

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import minilora
    from minilora.train import sharding

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (8, 128))
    setups = {}
    for placement in ("replicated", "sharded"):
        model = minilora.load_model(folder, task="causal-lm", dtype=torch.float32)
        minilora.inject(model, minilora.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
        trained = [p for p in model.parameters() if p.requires_grad]
        if placement == "replicated":
            sharding.shard_model(model)
        else:
            for block in sharding.transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)
            trained = [p for p in model.parameters() if p.requires_grad]
        setups[placement] = (model, trained, torch.optim.AdamW(trained, lr=1e-4, foreach=False))
    times = {k: [] for k in setups}
    for _ in range(steps):
        for placement, (model, trained, opt) in setups.items():
            dist.barrier()
            t = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if placement == "replicated":
                sharding.average_gradients(trained, world)
            opt.step()
            opt.zero_grad()
            times[placement].append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        print("ROWS " + json.dumps({k: statistics.median(v[1:]) for k, v in times.items()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, folder: str, nf4: bool) -> list[dict]:
    me = [str(Path(__file__).resolve()), "--worker", "--model", folder] + (["--nf4"] if nf4 else [])
    if n == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ROWS ")), None)
    if line is None:
        raise SystemExit(f"{n} processes failed:\n{out.stderr[-3000:]}")
    return json.loads(line[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from its wheel)")
    parser.add_argument("--nf4", action="store_true", help="quantize the base to NF4 as it loads")
    parser.add_argument("--placement", action="store_true", help="time a step with the adapter replicated or sharded")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return placement_worker(args.model) if args.placement else worker(args.model, args.nf4)
    folder = args.model
    if folder is None:
        sys.path.insert(0, str(HERE.parent / "examples"))
        from _smollm import smollm2_folder

        folder = str(smollm2_folder())
    if args.placement:
        me = [str(Path(__file__).resolve()), "--worker", "--placement", "--model", folder]
        out = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2",
                              "--master_addr=127.0.0.1", f"--master_port={free_port()}", *me],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROWS ")), None)
        if line is None:
            raise SystemExit(out.stderr[-3000:])
        medians = json.loads(line[5:])
        for k, v in medians.items():
            print(f"adapter {k:10}  step {v:6.2f} s  (2 processes, median)")
        return
    results = {n: run(n, folder, args.nf4) for n in (1, 2, 4)}
    single = results[1][0]
    print(f"{'base':5} {'N':>2} {'rank':>4} {'base_mb':>8} {'rss_mb':>8} {'single/N':>8} {'overhead':>8} {'peak_mb':>8}")
    for n, rows in results.items():
        for r in rows:
            print(f"{'nf4' if args.nf4 else 'fp32':5} {n:>2} {r['rank']:>4} {r['base_mb']:8.1f} {r['rss_mb']:8.1f} "
                  f"{single['rss_mb'] / n:8.1f} {r['rss_mb'] - single['rss_mb'] / n:8.1f} {r['peak_mb']:8.1f}")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"fsdp_memory-{'nf4' if args.nf4 else 'fp32'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": folder, "nf4": args.nf4, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
