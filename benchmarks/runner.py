"""The benchmark runner: every suite, one results file, one Markdown table.

    .venv/bin/python -m benchmarks                          # all suites (make bench)
    .venv/bin/python -m benchmarks lora_linear nf4          # suites by name
    .venv/bin/python -m benchmarks --quick lora_linear      # tiny sizes: checks the plumbing, not the speed
    make bench SUITES="lora_linear nf4" ARGS="--quick"

Suites (each checks that the stacks it compares compute the same thing before it
times them, interleaves the stacks, and reports medians and ratios from this run):

    lora_linear  one LoRA layer, fwd and fwd+bwd: minilora vs peft vs nn.Linear (lora_linear.py)
    nf4          NF4 quantize / dequantize GB/s and NF4Linear vs Linear4bit forward (bench_nf4.py)
    train_step   SmolLM2-135M LoRA and QLoRA training step vs transformers + peft (bench_train_lm.py)
    load         peak memory of loading SmolLM2-135M vs transformers (bench_load.py)

Writes, under benchmarks/results/ (or --out):

    <host>-<date>.json        metadata (host, date, device, CPU, library versions,
                              the command) and every suite's full record
    <host>-<date>-<suite>.png one figure per suite
    latest.md                 the Markdown printed at the end, ready for a README

A --quick run writes <host>-<date>-quick.* and latest-quick.md instead, so it never
overwrites a full run. A suite that fails (stacks that disagree included) is reported
loudly, recorded with its error in the JSON, and makes the exit status 1; the other
suites still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import common


@dataclass(frozen=True)
class Options:
    quick: bool
    repeats: int | None
    device: str | None
    log: Callable[[str], None]


@dataclass(frozen=True)
class Suite:
    about: str
    run: Callable[[Options], dict]
    markdown: Callable[[dict], str]


def _lora_linear(o: Options) -> dict:
    from . import lora_linear

    return lora_linear.run(quick=o.quick, repeats=o.repeats, device=o.device, log=o.log)


def _lora_linear_md(record: dict) -> str:
    from . import lora_linear

    return lora_linear.markdown(record)


def _nf4(o: Options) -> dict:
    from . import bench_nf4

    if o.quick:
        return bench_nf4.run(reps=o.repeats or 1, big_reps=o.repeats or 1, shapes=((1024, 1024),), device=o.device,
                             linear_shape=(1024, 1024), linear_tokens=(1, 16), log=o.log)
    # The script's defaults are 5 / 3 rounds; 3 / 2 keep `make bench` under 15 minutes on 2 CPU cores.
    return bench_nf4.run(reps=o.repeats or 3, big_reps=o.repeats or 2, device=o.device, log=o.log)


def _nf4_md(record: dict) -> str:
    from . import bench_nf4

    return bench_nf4.markdown(record)


def _train_step(o: Options) -> dict:
    from . import bench_train_lm

    if o.quick:
        return bench_train_lm.run(steps=o.repeats or 1, seq_len=64, batch_size=1, checkpointing=("off",), qlora=True,
                                  log=o.log)
    # ~5-9 s a step per stack on 2 CPU cores: 3 timed steps (+1 warm-up) per stack and mode, in two
    # fresh processes each (the second round in reverse order), so one slow process is not the figure.
    return bench_train_lm.run(steps=o.repeats or 3, repeats=2, checkpointing=bench_train_lm.MODES, qlora=True,
                              log=o.log)


def _train_step_md(record: dict) -> str:
    from . import bench_train_lm

    return bench_train_lm.markdown(record)


def _load(o: Options) -> dict:
    from . import bench_load

    rows = bench_load.ROWS[:2] if o.quick else bench_load.ROWS  # quick: the fp32 pair only
    return bench_load.run(repeat=o.repeats or 1, rows=rows, log=o.log)


def _load_md(record: dict) -> str:
    from . import bench_load

    return bench_load.markdown(record)


SUITES = {
    "lora_linear": Suite("one LoRA layer, forward and forward+backward: minilora vs peft vs nn.Linear",
                         _lora_linear, _lora_linear_md),
    "nf4": Suite("NF4 quantize / dequantize, and an NF4 layer's forward: minilora vs bitsandbytes", _nf4, _nf4_md),
    "train_step": Suite("a LoRA / QLoRA training step on SmolLM2-135M: minilora vs transformers + peft",
                        _train_step, _train_step_md),
    "load": Suite("peak memory of loading SmolLM2-135M: minilora vs transformers", _load, _load_md),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="suites:\n" + "\n".join(f"  {k:<12} {s.about}" for k, s in SUITES.items()))
    p.add_argument("suites", nargs="*", metavar="SUITE", help="suites to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one or few rounds: a smoke test")
    p.add_argument("--repeats", type=int, default=None,
                   help="override each suite's main count (lora_linear / nf4 timed rounds, train_step timed "
                        "steps, load processes per row)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; lora_linear, nf4)")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (set before torch loads)")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="folder for JSON, PNG and Markdown")
    p.add_argument("--no-plots", action="store_true", help="write no PNG")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--env", action="store_true", help="print the environment record (imports bitsandbytes) and exit")
    args = p.parse_args(argv)
    # `make bench SUITES="a b"` may hand them over as one word.
    args.suites = [name for arg in args.suites for name in arg.replace(",", " ").split()] or list(SUITES)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    return args


def markdown(meta: dict, records: dict[str, dict]) -> str:
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "peft", "bitsandbytes", "transformers")
                         if meta.get(k))
    lines = [f"## Benchmarks: {meta['host']}, {meta['date']}" + (" (quick: tiny sizes, not a measurement)"
                                                                 if meta["quick"] else ""),
             "",
             f"`{meta['command']}` on {meta['device']}; {versions}; torch threads {meta['torch_threads']}, "
             f"load average at the end {meta['load_average_at_end']}."]
    for name, record in records.items():
        lines += ["", section(name, record)]
    return "\n".join(lines) + "\n"


def section(name: str, record: dict) -> str:
    """One suite's Markdown: heading, table(s), notes, wall time."""
    head = f"### {name}: {SUITES[name].about}\n\n"
    if "error" in record:
        return head + f"**FAILED**: {record['error']}"
    try:
        body = SUITES[name].markdown(record)
    except Exception as e:  # noqa: BLE001 - a broken table must not lose the measurements (in the JSON)
        body = f"(no table: {type(e).__name__}: {e}; the measurements are in the JSON)"
    return head + body + f"\n\n_suite wall time {record['wall_seconds']:.0f} s_"


def environment(device, command: str, quick: bool) -> dict:
    meta = common.environment(device, command)
    meta["quick"] = quick
    return meta


def main(argv=None) -> int:
    """Run the suites; returns the exit status (1 when a suite failed)."""
    command = common.command_line() if argv is None else " ".join(["python -m benchmarks", *argv])
    args = parse_args(argv)
    if args.list:
        for name, suite in SUITES.items():
            print(f"{name:<12} {suite.about}")
        return 0
    if args.threads:  # OMP_NUM_THREADS reaches OpenMP only if torch / bitsandbytes are not loaded yet
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.env:
        bnb = common.import_bitsandbytes()
        print(json.dumps({**environment(args.device, command, args.quick), "bitsandbytes_imported": bnb.__version__},
                         indent=2))
        return 0

    def log(message: str) -> None:
        print(message, flush=True)

    options = Options(args.quick, args.repeats, args.device, log)
    started = time.perf_counter()
    records: dict[str, dict] = {}
    for name in args.suites:
        log(f"=== {name}: {SUITES[name].about}")
        t0 = time.perf_counter()
        try:
            record = SUITES[name].run(options)
        except Exception as e:  # noqa: BLE001 - reported loudly below, recorded, exit status 1
            record = {"suite": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"\n!!! {name} FAILED: {record['error']}\n{record['traceback']}", file=sys.stderr, flush=True)
        record["wall_seconds"] = time.perf_counter() - t0
        records[name] = record
        if "error" not in record:  # the table now, not only at the end of a long run
            log("\n" + section(name, record) + "\n")

    meta = environment(args.device, command, args.quick)  # after the runs: load average at the end
    meta["suites"] = args.suites
    meta["wall_seconds"] = time.perf_counter() - started
    stem = f"{socket.gethostname()}-{dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps({**meta, "results": records}, indent=2, default=str) + "\n")  # first: keep it
    files = {} if args.no_plots else draw(records, out, stem, log)
    meta["plots"] = {name: path.name for name, path in files.items()}
    json_path.write_text(json.dumps({**meta, "results": records}, indent=2, default=str) + "\n")
    text = markdown(meta, records)
    md_path = out / ("latest-quick.md" if args.quick else "latest.md")
    md_path.write_text(text)
    print("\n" + text)
    for path in [json_path, md_path, *files.values()]:
        print(f"wrote {_shown(path)}")
    failed = [name for name, r in records.items() if "error" in r]
    print(f"{len(records)} suite(s) in {meta['wall_seconds']:.0f} s" +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def draw(records: dict[str, dict], out: Path, stem: str, log) -> dict[str, Path]:
    try:
        from . import plots

        plots._pyplot()
    except ImportError:
        log("no PNG: matplotlib is missing; install the bench extra: pip install -e '.[bench]'")
        return {}
    files = {}
    for name, record in records.items():
        if "error" in record:
            continue
        try:
            files[name] = plots.plot(name, record, out / f"{stem}-{name}.png")
        except Exception as e:  # noqa: BLE001 - a broken figure must not lose the measurements
            log(f"no PNG for {name}: {type(e).__name__}: {e}")
    return files


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
