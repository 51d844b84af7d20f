"""The loss-only forward of our causal LMs on the fast path (minilora/fast/linear_ce.py)
against the plain logits path (models/lm_head.py) and transformers: same loss, same
gradients, no logits built."""

import pytest
import torch

import minilora.fast
from minilora import LoraConfig, inject
from minilora.lora.named_adapters import disable_adapters
from minilora.train.loop import loss_sum
from test_models_llama_gpt2 import build_pair, padded_batch


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["llama_gqa", "llama3_rope_tied", "gpt2"])
def test_loss_only_forward_matches_logits_path_and_transformers(case):
    hf, ours = build_pair(case)
    inject(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    minilora.fast.enable(ours)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ours.eval()  # no dropout: both paths must see the same network
    ids, mask, labels = padded_batch("right")
    labels = labels.clone()
    labels[:, :3] = -100  # a prompt with no loss
    plain = ours(ids, attention_mask=mask, labels=labels)
    plain.loss.backward()
    want = _grads(ours)
    ours.zero_grad()
    fused = ours(ids, attention_mask=mask, labels=labels, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    got = _grads(ours)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fused.loss_sum, plain.loss * n, rtol=1e-6, atol=1e-5)
    assert want.keys() == got.keys() and any("lora_A" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    # Before any adapter update the loss is the base model's: transformers' loss.
    base_hf = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    with disable_adapters(ours):
        torch.testing.assert_close(ours(ids, attention_mask=mask, labels=labels, return_logits=False).loss, base_hf,
                                   rtol=1e-5, atol=1e-6)


def test_trainer_loss_uses_the_loss_only_forward():
    _, ours = build_pair("llama_gqa")
    inject(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    minilora.fast.enable(ours)
    ids, mask, labels = padded_batch("right")
    total, logits = loss_sum(ours, {"input_ids": ids, "attention_mask": mask, "labels": labels}, "causal-lm")
    assert logits is None
    torch.testing.assert_close(total, ours(ids, attention_mask=mask, labels=labels).loss_sum)


def test_adapted_head_takes_the_logits_path():
    _, ours = build_pair("llama_gqa")
    inject(ours, LoraConfig(r=4, alpha=8, target_modules=["lm_head"]))
    minilora.fast.enable(ours)
    ids, mask, labels = padded_batch("right")
    out = ours(ids, attention_mask=mask, labels=labels, return_logits=False)
    assert out.logits is not None  # LoRA on lm_head: the head is not a plain nn.Linear
    torch.testing.assert_close(out.loss, ours(ids, attention_mask=mask, labels=labels).loss)
