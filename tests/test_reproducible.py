"""Same seed, same machine, same bits (issue 19, finding 13).

The source of the run-to-run differences was MKL's first-call kernel race in torch's
CPU unary functions (minilora/models/vml_warmup.py): a fresh process's first tanh, exp
or erf could run a low-accuracy kernel on one thread's half of the tensor. Without
the warm-up, 8 of 30 fresh processes here got a first tanh up to 872 ulp off.
The oracle is float64: each process's first tanh must be correctly rounded to 1 ulp.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

# 8 in 30 failed before the warm-up. Each process costs an import of torch (2-3 s here),
# so the default run starts 4 (a regression passes them all by chance with p = 0.29)
# and `make test-slow` 16 (p < 1e-2).
PROCESSES = {"default": 4, "slow": 16}

FIRST_TANH = """
import sys, numpy as np, torch
import minilora  # noqa: F401  the import is what is tested
x = torch.randn(32 * 12 * 64 * 64, generator=torch.Generator().manual_seed(0))
(x.view(-1, 256) @ x[:256 * 256].view(256, 256)).sum()  # starts torch's intra-op threads first
sys.stdout.buffer.write(torch.tanh(x).numpy().tobytes())
"""


def _first_tanh() -> np.ndarray:
    out = subprocess.run([sys.executable, "-c", FIRST_TANH], capture_output=True, check=True, timeout=120)
    return np.frombuffer(out.stdout, dtype=np.float32)


@pytest.mark.parametrize("processes", [PROCESSES["default"],
                                       pytest.param(PROCESSES["slow"], marks=pytest.mark.slow)])
def test_every_fresh_process_computes_its_first_tanh_to_one_ulp(processes):
    x = torch.randn(32 * 12 * 64 * 64, generator=torch.Generator().manual_seed(0))
    ref = torch.tanh(x.double()).numpy()
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    # One at a time: two processes sharing the two cores here rarely overlap their threads'
    # first calls, which hides the race.
    results = [_first_tanh() for _ in range(processes)]
    worst = [float(np.max(np.abs(r.astype(np.float64) - ref) / ulp)) for r in results]
    assert max(worst) <= 1.0, f"first tanh off by up to {max(worst):.0f} ulp in {sum(w > 1 for w in worst)} processes"
    assert all(np.array_equal(r, results[0]) for r in results), "fresh processes disagree bit for bit"


def test_warm_up_leaves_the_thread_count_and_results_alone():
    from minilora.models.vml_warmup import warm_up_vml

    threads = torch.get_num_threads()
    x = torch.linspace(-3, 3, 1 << 16)
    before = torch.erf(x)
    warm_up_vml()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.erf(x), before)
