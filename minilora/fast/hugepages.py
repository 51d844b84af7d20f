"""Large CPU tensors backed by 2 MiB transparent huge pages where Linux allows it.

A fresh tensor's memory is mapped lazily: the first write to each 4 KiB page traps
into the kernel, which zeroes the page. For a 64 MiB output that is 16,384 faults,
which can cost more than the NF4 decoding that fills the tensor.

`madvise(MADV_HUGEPAGE)` asks the kernel to back the range with 2 MiB pages: 512
times fewer faults, and one zeroing pass per 2 MiB. It only advises: where
transparent huge pages are off (`/sys/kernel/mm/transparent_hugepage/enabled` is
`never`), on other systems, or if the call fails, the tensor is an ordinary one.
The tensor itself is a plain `torch.empty`; only the 2 MiB-aligned interior of its
allocation is advised, so nothing about its storage, size or lifetime changes.

Used by the fast NF4 codec (minilora.fast.nf4_codec) for fresh dequantization
outputs; the reference in minilora.qlora.nf4 allocates plain tensors. Whether the
advice wins depends on how the machine backs its memory (a 2 MiB fault is sometimes
far slower than 512 small ones): benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
# Below this, there are too few faults to be worth a system call.
MIN_BYTES = 8 * HUGE_PAGE


@lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise huge pages for the aligned interior of a CPU tensor's memory not yet
    written. Returns whether the advice was given."""
    madvise = _madvise()
    nbytes = t.numel() * t.element_size()
    if madvise is None or t.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    start = t.data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    return hi > lo and madvise(lo, hi - lo, MADV_HUGEPAGE) == 0


def empty_huge(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """`torch.empty(shape, dtype, device)`, backed by huge pages when it is a large CPU tensor."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
