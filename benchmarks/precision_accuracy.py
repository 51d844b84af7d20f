"""Does a bf16 step learn as well as fp32? SST-2 with the demo's recipe, seeds 0-3.

    .venv/bin/python -m benchmarks.precision_accuracy [--seeds 0 1 2 3] [--max-train N]

all-MiniLM-L6-v2, LoRA r=8 on every linear and a new head (minilora/cli/demo.py's
DEMO_SETTINGS), one pass over 20,000 SST-2 sentences, accuracy on the 872 dev
sentences. Each seed runs in fp32 and in bf16 (train.precision); the table gives
per-seed accuracies, the means and the mean difference, and
benchmarks/results/precision_sst2-<host>-<date>.json keeps the record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

from minilora.cli.demo import DEFAULT_MODEL, _config, find_data
from minilora.io.atomic import atomic_write_text
from minilora.train.run import run_training


def run(seed: int, prec: str, max_train: int | None) -> dict:
    train, dev = find_data()
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(DEFAULT_MODEL, train, dev, out, max_train, None)
        cfg.train.seed, cfg.train.precision = seed, prec
        t0 = time.perf_counter()
        result = run_training(cfg, progress=False, log=lambda *a: None)
        return {"seed": seed, "precision": prec, "accuracy": result["eval"]["accuracy"],
                "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--max-train", type=int, default=None, help="fewer sentences (a quick check, not the table)")
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for prec in ("fp32", "bf16"):  # interleaved, so drift hits both alike
            rows.append(run(seed, prec, args.max_train))
            r = rows[-1]
            print(f"seed {seed} {prec}: {r['accuracy']:.2%} in {r['seconds']:.0f} s", flush=True)
    mean = {p: statistics.mean(r["accuracy"] for r in rows if r["precision"] == p) for p in ("fp32", "bf16")}
    secs = {p: statistics.median(r["seconds"] for r in rows if r["precision"] == p) for p in ("fp32", "bf16")}
    print("\n| seed | fp32 | bf16 |\n|---|---|---|")
    for seed in args.seeds:
        acc = {r["precision"]: r["accuracy"] for r in rows if r["seed"] == seed}
        print(f"| {seed} | {acc['fp32']:.2%} | {acc['bf16']:.2%} |")
    print(f"| mean | {mean['fp32']:.2%} | {mean['bf16']:.2%} |")
    print(f"\nbf16 - fp32: {100 * (mean['bf16'] - mean['fp32']):+.2f} points; median run time "
          f"fp32 {secs['fp32']:.0f} s, bf16 {secs['bf16']:.0f} s")
    record = {"host": socket.gethostname(), "date": dt.date.today().isoformat(), "rows": rows, "mean": mean,
              "median_seconds": secs, "max_train": args.max_train}
    out = Path(__file__).parent / "results" / f"precision_sst2-{record['host']}-{record['date']}.json"
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
