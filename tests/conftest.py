"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is
set here, before any test module imports minilora.kernels: CI has no GPU and runs
the Triton kernels in the interpreter on the CPU. With a GPU it stays unset.
"""

import os

import torch

# On a GPU machine the kernels run for real (the CUDA tests compare them exactly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Oracles (transformers, peft) must never reach for a hub: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config):
    """The versions this run tests with: torch (pinned by the Makefile) and the oracles in the lock."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    names = ("torch", "transformers", "peft", "bitsandbytes", "huggingface_hub", "kernels", "tokenizers",
             "safetensors", "numpy", "triton", "pytest", "hypothesis", "matplotlib")
    return "toolchain: " + ", ".join(f"{n} {v(n)}" for n in names)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reference_nf4_codec():
    """Each test starts on the reference NF4 codec: fast.enable switches it for the whole
    process (the same bytes), and a test must not depend on the order tests ran in."""
    from minilora.qlora import nf4

    nf4.use_codec(None)
    yield
    nf4.use_codec(None)
