"""Progress that suits where it goes.

On a terminal a tqdm bar redraws in place. Written to a file or a pipe (CI, `nohup`,
a cluster job's log) the same redraws pile up as carriage returns on one ever-longer
line, so there a loop prints a plain line instead, and only now and then: once at
least `every_fraction` of the work (5%) *and* `every_seconds` (10 s) have passed
since the last line, and once at the end. A loop of any length then writes at most
about 1/every_fraction + 1 lines, none more often than every `every_seconds`.

    progress = Progress(total=625, desc="train")
    for step in ...:
        progress.update(loss="0.4123", lr="9.6e-04")
    progress.close()
"""

from __future__ import annotations

import sys
import time


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """A tqdm bar on a terminal, a few plain log lines elsewhere; nothing when disabled."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True, unit: str = "it",
                 stream=None, every_fraction: float = 0.05, every_seconds: float = 10.0):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.postfix: dict[str, str] = {}
        self._bar = None
        self._start = self._last_time = time.perf_counter()
        self._last_n = initial
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, **postfix: str) -> None:
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            return
        now = time.perf_counter()
        if self.n - self._last_n >= self.every_fraction * self.total and now - self._last_time >= self.every_seconds:
            self._line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._last_n:
            self._line(time.perf_counter())
        self.enabled = False

    def _line(self, now: float) -> None:
        self._last_n, self._last_time = self.n, now
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        fields = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}{fields}  {now - self._start:.0f}s",
              file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
