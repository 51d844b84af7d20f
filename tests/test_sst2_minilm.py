"""Issue 5's real-data goal: examples/sst2_minilm.toml (LoRA r=8, alpha=32, dropout 0.01
on query+value of all-MiniLM-L6-v2, a new head through modules_to_save, 20,000 SST-2
sentences, 1 epoch, batch 32, lr 1e-3, max length 64) reaches 86% dev accuracy.

Slow (about 2 minutes of training on 2 cores). As in benchmarks/bench_train_cls.py,
there is no evaluation inside the epoch, so the accuracy is the last step's and the
dev set picks nothing. This is seed 0, the toml's, which gives 86.0%: the top of the
recipe's spread, not its level (seeds 0-3 give 84.3-86.0%, mean 85.3%; the Trainer's
mean over seeds 0-2 is 85.0%; benchmarks/RESULTS.md). It checks that this run still
does what was measured; it does not show the recipe reaches 86% on average.

The measured run is fp32, so the test pins `train.precision = "fp32"`: on a CPU with
AMX, "auto" trains in bf16, a different rounding path, and seed 0 then lands elsewhere
in the same spread (84.9%; bf16 and fp32 over seeds are compared in RESULTS.md,
"SST-2 on all-MiniLM-L6-v2 in bf16", and tests/test_precision.py checks the step itself).
"""

from pathlib import Path

import pytest

from minilora.train.config import load_config
from minilora.train.run import run_training

TOML = Path(__file__).resolve().parents[1] / "examples" / "sst2_minilm.toml"


@pytest.mark.slow
def test_sst2_minilm_reaches_86_percent(tmp_path):
    cfg = load_config(TOML)
    cfg.train.eval_every = None  # evaluated once, at the epoch's end: the last step
    cfg.train.precision = "fp32"  # what was measured (see the docstring)
    cfg.output.dir = str(tmp_path / "run")
    summary = run_training(cfg, progress=False, log=lambda *a: None)
    assert summary["steps"] == 625  # 20,000 sentences / 32
    assert summary["eval"]["accuracy"] >= 0.86, summary["eval"]
