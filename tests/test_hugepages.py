"""Fresh dequantization outputs of the fast NF4 codec are backed by huge pages (fewer
page faults), and are otherwise ordinary tensors."""

import subprocess
import sys
from pathlib import Path

import torch

from minilora.fast import nf4_codec
from minilora.fast.hugepages import HUGE_PAGE, MIN_BYTES, advise_huge_pages
from minilora.qlora.nf4 import dequantize_nf4_torch, quantize_nf4


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text.split("[")[1].split("]")[0]


def _anon_huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages of the mappings t overlaps, from /proc/self/smaps (madvise splits
    the allocation's mapping, so there are several)."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and start < hi
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_large_fresh_tensor_gets_huge_pages():
    # In a fresh process: in a long-lived one the allocator may hand back memory that
    # was already touched (no faults left to save, and nothing for the advice to change).
    assert _thp_mode() in ("always", "madvise"), "this machine's kernel has transparent huge pages off"
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_hugepages import _anon_huge_kb
from minilora.fast.hugepages import HUGE_PAGE, MIN_BYTES, empty_huge
t = empty_huge((MIN_BYTES // 4 + 12345,), dtype=torch.float32)
assert t.shape == (MIN_BYTES // 4 + 12345,) and t.dtype == torch.float32 and t.is_contiguous()
t.fill_(1.0)  # first touch: the faults happen now
print(_anon_huge_kb(t))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= HUGE_PAGE // 1024, "no huge page behind a madvised tensor"


def test_small_and_non_cpu_tensors_are_left_alone():
    assert not advise_huge_pages(torch.empty(1000))
    assert not advise_huge_pages(torch.empty(MIN_BYTES // 4, device="meta"))


def test_fresh_and_reused_dequantization_agree():
    torch.manual_seed(0)
    w = torch.randn(1024, 4099)  # 16 MiB of fp32: large enough to be advised, with a partial block
    q = quantize_nf4(w)
    fresh = nf4_codec.dequantize(q, torch.float32)  # advised onto huge pages
    reused = nf4_codec.dequantize(q, torch.float32, out=torch.full_like(w, float("nan")))
    assert fresh.shape == w.shape and fresh.untyped_storage().nbytes() == w.numel() * 4
    assert torch.equal(fresh, reused) and torch.equal(fresh, dequantize_nf4_torch(q, torch.float32))
