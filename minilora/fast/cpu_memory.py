"""Keep freed CPU memory in the process while training, instead of faulting it in again every step.

A training step allocates and frees the same activation sizes every step: on
SmolLM2-135M at 1,024 tokens, some 10 GB of 2 to 6 MB tensors. glibc's malloc
serves a request above M_MMAP_THRESHOLD with a fresh mmap and returns it on free;
the threshold starts at 128 KiB and follows the largest block freed so far (up to
32 MiB), and the heap's free top goes back to the kernel once it is larger than
M_TRIM_THRESHOLD (twice the mmap threshold). Either way the memory leaves the
process, and the next step's first write to each 4 KiB page traps into the kernel,
which zeroes it: an elementwise op over a fresh MLP activation then costs several
times its arithmetic (benchmarks/RESULTS.md, "Moved from docstrings").

`hold_freed_memory()` fixes M_MMAP_THRESHOLD at its 32 MiB maximum and raises
M_TRIM_THRESHOLD, so freed blocks stay in the heap and the next step reuses them
without a fault. Peak RSS does not grow: the heap's high-water mark was reached
anyway (the measurement is in benchmarks/RESULTS.md). On exit the trim threshold is put back and the heap trimmed,
so the memory is returned after training. Setting a threshold turns off glibc's
dynamic adjustment for the rest of the process; 32 MiB is where it would end up.

Only glibc has these knobs (mallopt, malloc_trim); elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from functools import lru_cache

from .lean_malloc import glibc_version

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
DEFAULT_TRIM_THRESHOLD = 128 << 10
HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free heap top


@lru_cache(maxsize=1)
def _glibc():
    if glibc_version() is None:
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def hold_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, malloc keeps freed memory for reuse; yields whether it could."""
    libc = _glibc() if enabled else None
    held = libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, HELD_TRIM_THRESHOLD))
    try:
        yield held
    finally:
        if held:
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
