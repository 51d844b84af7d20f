"""minilora.fast.optim.AdamW against its oracle, torch.optim.AdamW: the same parameters bit
for bit after every step (fused and foreach), state dicts that load both ways, and a
CPU training run that never imports torch._dynamo or Triton (why the class exists)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from minilora.fast.optim import AdamW
from tiny_models import save_tiny_bert_folder, write_sentiment_tsv


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    decay = [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(3, 9, generator=g).requires_grad_()]
    no_decay = [torch.randn(5, generator=g).requires_grad_()]
    return decay, no_decay


def _groups(decay, no_decay):
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _run(opt, params, steps, seed=1, start=0):
    """Steps with fresh gradients and a changing rate, as the schedule sets it."""
    g = torch.Generator().manual_seed(seed)
    for i in range(start, start + steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 - i / 20)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_every_step_is_bit_identical_to_torch(fused):
    ours_d, ours_n = _params()
    ref_d, ref_n = _params()
    ours = AdamW(_groups(ours_d, ours_n), lr=1e-2, fused=fused)
    ref = torch.optim.AdamW(_groups(ref_d, ref_n), lr=1e-2, fused=fused or None, foreach=None if fused else True)
    for step in range(6):
        _run(ours, ours_d + ours_n, 1, seed=step)
        _run(ref, ref_d + ref_n, 1, seed=step)
        for a, b in zip(ours_d + ours_n, ref_d + ref_n):
            assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
    # and it moved: decay on the first group, none on the second
    assert not torch.equal(ours_d[0], _params()[0][0])


def test_state_dict_round_trips_with_torch_both_ways():
    for src_cls, dst_cls in ((AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)):
        kwargs = {"fused": True}
        a_d, a_n = _params()
        a = src_cls(_groups(a_d, a_n), lr=1e-2, **kwargs)
        _run(a, a_d + a_n, 3)
        b_d, b_n = [p.detach().clone().requires_grad_() for p in a_d], [a_n[0].detach().clone().requires_grad_()]
        b = dst_cls(_groups(b_d, b_n), lr=5.0, **kwargs)  # a wrong rate, replaced by the saved one
        b.load_state_dict(copy.deepcopy(a.state_dict()))  # as from a file: nothing shared with a
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
        _run(a, a_d + a_n, 3, seed=7, start=3)
        _run(b, b_d + b_n, 3, seed=7, start=3)
        for x, y in zip(a_d + a_n, b_d + b_n):
            assert torch.equal(x, y), (src_cls, dst_cls)


def test_state_of_other_parameters_is_refused():
    d, n = _params()
    opt = AdamW(_groups(d, n), lr=1e-2)
    _run(opt, d + n, 1)
    other = AdamW([{"params": d}], lr=1e-2)
    with pytest.raises(ValueError, match="same LoRA settings"):
        other.load_state_dict(opt.state_dict())


def test_bad_hyperparameters_name_the_value():
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.5))


TRAIN_SCRIPT = r"""
import json, sys
from minilora.train.batching import classification_examples
from minilora import LoraConfig
from minilora.train.config import TrainSection
from minilora.train.data import read_classification
from minilora.lora.inject import inject
from minilora.io.loading import load_model
from minilora.io.tokenizer import load_tokenizer
from minilora.train.loop import CLASSIFICATION, train

folder, tsv = sys.argv[1], sys.argv[2]
data = read_classification(tsv, "sentence", "label")
tok = load_tokenizer(folder)
examples = classification_examples(tok, data, 16).examples
model = load_model(folder, task=CLASSIFICATION, num_labels=2)
inject(model, LoraConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
train(model, examples, None, TrainSection(epochs=1, batch_size=8, lr=1e-3), task=CLASSIFICATION, out_dir=None,
      pad_token_id=tok.pad_token_id, num_labels=2, progress=False)
print(json.dumps({m: m in sys.modules for m in ("torch._dynamo", "triton")}))
"""


def test_cpu_training_run_imports_neither_dynamo_nor_triton(tmp_path):
    folder = save_tiny_bert_folder(tmp_path / "bert")
    tsv = write_sentiment_tsv(tmp_path / "train.tsv")
    out = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(folder), str(tsv)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch._dynamo": False, "triton": False}
