"""Helpers shared by the benchmarks (the bench_*.py scripts, lora_linear.py and the runner).

- memory: current RSS and peak RSS (VmHWM) of *this* process, in MB;
- child processes: run this script again with `--child ...` in a fresh Python, read
  the one JSON line it prints last;
- run order: interleave the stacks so slow drift of a shared machine (thermal, other
  jobs) does not favour whichever stack runs first;
- timing inside one process: `Clock` (CUDA events on a GPU, perf_counter on the CPU)
  and `time_interleaved` (warm-up, rotating rounds);
- correctness before timing: `assert_close`, which raises StacksDisagree;
- bitsandbytes imported so that the repository's kernels/ cannot shadow its `kernels`;
- environment: library versions, device, host, command, for the results JSON;
- a plain-text table and a Markdown one.

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
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MB = 1024 * 1024


# --------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident set size of this process now, in MB (VmRSS on Linux, psutil elsewhere)."""
    now = _status_mb("VmRSS")
    if now is not None:
        return now
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """The largest RSS of this program since it started, in MB: VmHWM on Linux.

    Not ru_maxrss there: Linux carries it across exec, so a child spawned by a process
    holding 2.3 GB (the benchmark runner after its NF4 suite) reports at least 2.3 GB
    whatever it allocates itself, and a child that restarts itself (lean_malloc) would
    count its first start-up. ru_maxrss is the fallback elsewhere.
    """
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
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


# --------------------------------------------------------------------------- timing


class Clock:
    """Timestamps inside one timed call, read as the seconds between consecutive marks.

    On a GPU the marks are CUDA events, so what is measured is GPU time between them,
    with no host synchronisation in between; `segments()` synchronises once at the
    end. On the CPU they are perf_counter readings.
    """

    def __init__(self, device):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._marks: list = []

    def _now(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # nothing from before the call may run inside it
        self._marks = [self._now()]

    def mark(self) -> None:
        self._marks.append(self._now())

    def segments(self) -> list[float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self._marks, self._marks[1:])]
        return [b - a for a, b in zip(self._marks, self._marks[1:])]


def whole(fn: Callable[[], object]) -> Callable[[Clock], object]:
    """A plain callable as a timed call with one segment: the call itself."""

    def call(clock: Clock):
        clock.start()
        out = fn()
        clock.mark()
        return out

    return call


def rotated(names: list, round_index: int) -> list:
    """Round i starts at the i-th name (A,B,C / B,C,A / C,A,B ...): no name always runs first."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def time_interleaved(calls: dict[str, Callable[[Clock], object]], repeats: int, device, warmup: int = 1,
                     on_warmup: Callable[[dict], None] | None = None) -> dict[str, list[list[float]]]:
    """Time every call `repeats` times, interleaved, after `warmup` untimed rounds.

    Each call takes a Clock and marks it itself: clock.start() before the work,
    clock.mark() after each part (say forward, then backward). Returns, per name, one
    list of segment durations (seconds) per timed round. `on_warmup` receives the
    last warm-up round's return values by name (the place to check that the stacks
    agree before anything is timed).
    """
    names = list(calls)
    for w in range(warmup):
        outputs = {name: calls[name](Clock(device)) for name in rotated(names, w)}
        if on_warmup is not None and w == warmup - 1:
            on_warmup(outputs)
        del outputs
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            clock = Clock(device)
            calls[name](clock)
            times[name].append(clock.segments())
    return times


# --------------------------------------------------------------------------- correctness


class StacksDisagree(AssertionError):
    """Two stacks that are about to be timed do not compute the same thing."""


def assert_close(what: str, ours, theirs, tol: float) -> float:
    """max|ours - theirs| <= tol * max|theirs| (compared in float64), else StacksDisagree.

    Returns the relative difference found.
    """
    import torch

    if ours.shape != theirs.shape:
        raise StacksDisagree(f"{what}: shapes differ, {list(ours.shape)} vs {list(theirs.shape)}")
    a, b = ours.detach().double(), theirs.detach().double()
    scale = max(float(b.abs().max()), 1e-30) if b.numel() else 1.0
    diff = float((a - b).abs().max()) / scale if b.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        raise StacksDisagree(f"{what}: the stacks disagree, max |difference| = {diff:.3g} x max |value| "
                             f"(tolerance {tol:g}); refusing to time different computations")
    return diff


# --------------------------------------------------------------------------- bitsandbytes


def repo_kernels_shadow(module) -> Path | None:
    """The repository's own kernels/ folder if `module` was imported from it, else None.

    Only that folder can stand in for the PyPI package `kernels`: the real package may
    live under the repository too (in .venv/lib/.../site-packages), and is the right one.
    """
    ours = (ROOT / "kernels").resolve()
    origin = getattr(module, "__file__", None)
    if origin is None:  # a namespace package: its search path says where it came from
        paths = [Path(p).resolve() for p in getattr(module, "__path__", [])]
        return ours if ours in paths else None
    return ours if Path(origin).resolve().parent == ours else None


def import_bitsandbytes():
    """Import bitsandbytes and make sure the repository's kernels/ did not stand in for
    the PyPI package `kernels` that it tries to import (the repo root must not be on
    sys.path: run `python -m benchmarks`, whose __main__ drops it, or a script path)."""
    import bitsandbytes

    shadow = repo_kernels_shadow(sys.modules.get("kernels"))
    if shadow is not None:
        raise RuntimeError(f"bitsandbytes imported the repository's {shadow} as the package `kernels`: "
                           f"the repo root {ROOT} is on sys.path. Run the benchmarks as `python -m benchmarks` "
                           "or `python benchmarks/NAME.py`, not with the repo root on PYTHONPATH.")
    return bitsandbytes


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


def device_description(device=None) -> str:
    """"cuda: <GPU name>" or "cpu: <CPU model> (N logical CPUs)"."""
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()} ({os.cpu_count()} logical CPUs)"


def command_line() -> str:
    """The command this process was started with (python -m ... or a script path)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return " ".join([Path(argv[0]).name, *argv[1:]])


def environment(device=None, command: str | None = None) -> dict:
    """Versions, device, CPU and host, for the results JSON (imports torch only)."""
    import torch

    info = {
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": command or command_line(),
        "device": device_description(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": load_average(),
        "torch": torch.__version__,
    }
    from importlib import metadata

    # Versions from the installed metadata: importing peft here would import
    # bitsandbytes and transformers into the parent just to read a string.
    for name in ("triton", "peft", "bitsandbytes", "transformers", "safetensors", "tokenizers", "numpy",
                 "matplotlib"):
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


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The same columns as print_table, as a Markdown (GitHub) table; '-' where a value is missing."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in columns) + "|"]  # numbers right-aligned
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |")
    return "\n".join(lines)
