"""Helpers shared by the training benchmarks (bench_train_cls.py, bench_train_lm.py).

- memory: current RSS and peak RSS (ru_maxrss) of *this* process, in MB;
- child processes: run this script again with `--child ...` in a fresh Python, read
  the one JSON line it prints last;
- run order: interleave the stacks so slow drift of a shared machine (thermal, other
  jobs) does not favour whichever stack runs first;
- environment: library versions, CPU, host, command, for the results JSON;
- a plain-text table.

Only the standard library is imported at module level, so a child process can
import this module before it records its baseline memory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MB = 1024 * 1024


# --------------------------------------------------------------------------- memory


def rss_mb() -> float:
    """Resident set size of this process now, in MB (VmRSS on Linux, psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """The largest RSS this process ever had (getrusage(RUSAGE_SELF).ru_maxrss), in MB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # bytes on macOS, kB on Linux


# --------------------------------------------------------------------------- children


def child_env() -> dict:
    """Environment for child processes: offline, and no repo root on sys.path.

    The repository root must not be importable as a folder: its `kernels/` would
    shadow the PyPI package `kernels` that bitsandbytes/transformers look for.
    minilora itself is installed (editable) in the virtualenv.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    return env


RESULT_PREFIX = "@@RESULT "


def print_result(row: dict) -> None:
    """What a child prints last: one line, RESULT_PREFIX + JSON (libraries may print too)."""
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def run_child(script: str | Path, args: list[str], label: str, timeout: float | None = None) -> dict:
    """Run `python script --child ARGS` in a fresh process; return the JSON of its result line."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout)
    lines = [line[len(RESULT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: child failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"--- stdout (tail)\n{proc.stdout[-2000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def interleaved_order(items: list, repeats: int) -> list:
    """items, then items reversed, then items again ...: each item runs `repeats` times and
    no item always runs first (e.g. a, b, b, a for two items and two repeats)."""
    order = []
    for rep in range(repeats):
        order += items if rep % 2 == 0 else items[::-1]
    return order


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """Versions, CPU and host, for the results JSON (imports torch/transformers/peft)."""
    import torch

    info = {
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load_average(),
        "torch": torch.__version__,
    }
    from importlib import metadata

    # Versions from the installed metadata: importing peft here would import
    # bitsandbytes and transformers into the parent just to read a string.
    for name in ("transformers", "peft", "safetensors", "tokenizers", "numpy"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def results_path(benchmark: str) -> Path:
    return RESULTS / f"{benchmark}-{socket.gethostname()}-{dt.date.today().isoformat()}.json"


def write_results(benchmark: str, record: dict) -> Path:
    path = results_path(benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- output


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); a missing value prints as '-'."""
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths)))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None
