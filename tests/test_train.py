"""The training loop: exact accumulation, the schedule's formula, exact resume,
atomic checkpoints. References are float64 computations written out in the test."""

import copy
import json
import math
import shutil

import pytest
import torch
from torch import nn

import minilora.train.checkpoint as checkpoint
from minilora.train.schedule import lr_at
from minilora.train.loop import train
from toy_lm import VOCAB, adapter, args, lm_examples, toy_model

def reference_update(model, examples, lr):
    """One AdamW step on the mean token loss over all `examples`, in float64, by hand."""
    model = copy.deepcopy(model).double()
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        labels = torch.tensor(e["labels"][1:])
        logits = model(ids).logits[0, :-1]
        keep = labels != -100
        total = total + nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            # First AdamW step: m/(sqrt(v)+eps) = g/(|g|+eps); decay off.
            out[n] = p.detach() - lr * p.grad / (p.grad.abs() + 1e-8)
    return out


@pytest.mark.parametrize("micro,accum", [(1, 6), (2, 3), (4, 2), (5, 2)])  # (5, 2): a partial last micro-batch
def test_accumulation_equals_one_big_batch_float64_reference(micro, accum):
    examples = lm_examples(n=micro * accum - (1 if micro == 5 else 0))
    model = toy_model()
    want = reference_update(model, examples, lr=1e-2)
    train(model, examples, None, args(batch_size=micro, grad_accum=accum, max_steps=1), task="causal-lm",
          progress=False)
    got = adapter(model)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-6)


def test_accumulation_over_k_micro_batches_equals_batch_of_k_times_size():
    examples = lm_examples(n=12)
    a, b = toy_model(), toy_model()
    train(a, examples, None, args(batch_size=12, grad_accum=1, max_steps=1), task="causal-lm", progress=False)
    train(b, examples, None, args(batch_size=3, grad_accum=4, max_steps=1), task="causal-lm", progress=False)
    for n, p in adapter(a).items():
        torch.testing.assert_close(adapter(b)[n], p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_its_formula(schedule):
    base, total, warm, floor = 3e-4, 100, 10, 0.1
    for s in [0, 4, 9, 10, 11, 40, 55, 99]:
        got = lr_at(s, base_lr=base, total_steps=total, warmup_steps=warm, schedule=schedule, min_lr_ratio=floor)
        if s < warm:
            want = base * (s + 1) / warm
        else:
            p = (s - warm) / (total - warm)
            f = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "constant": None}[schedule]
            want = base if f is None else base * (floor + (1 - floor) * f)
        assert got == pytest.approx(want, rel=1e-12), s


def test_resume_gives_identical_per_step_losses(tmp_path, monkeypatch):
    examples = lm_examples(n=40)
    cfg = dict(batch_size=4, grad_accum=2, epochs=3, schedule="cosine", warmup_steps=2, save_every=4, log_every=1)
    full = train(toy_model(dropout=0.2), examples, None, args(**cfg), task="causal-lm",
                 out_dir=tmp_path / "full", progress=False)
    losses = [h["loss"] for h in full["history"]]
    assert len(losses) == 15  # 5 groups an epoch, 3 epochs

    # The same run, killed during step 10 (after the checkpoint of step 8)...
    import minilora.train.loop as train_module

    real_lr_at = train_module.lr_at

    def killed_at_step_10(step, **kw):
        if step == 9:
            raise KeyboardInterrupt
        return real_lr_at(step, **kw)

    run = tmp_path / "killed"
    monkeypatch.setattr(train_module, "lr_at", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(toy_model(dropout=0.2), examples, None, args(**cfg), task="causal-lm", out_dir=run, progress=False)
    monkeypatch.undo()
    assert checkpoint.resolve_checkpoint(run).name == "step-000008"

    # ...then resumed from its folder: every step's loss is the uninterrupted run's.
    resumed = train(toy_model(dropout=0.2), examples, None, args(**cfg, resume_from=str(run)), task="causal-lm",
                    out_dir=run, progress=False)
    assert [h["loss"] for h in resumed["history"]] == losses
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and len(logged) == len(set(logged)) == 15


def test_failed_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    examples = lm_examples(n=16)
    model = toy_model()
    train(model, examples, None, args(batch_size=4, max_steps=2, save_every=2), task="causal-lm",
          out_dir=tmp_path, progress=False)
    good = checkpoint.resolve_checkpoint(tmp_path)
    assert good.name == "step-000002"

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), {"step": 3})
    monkeypatch.undo()
    assert checkpoint.resolve_checkpoint(tmp_path) == good
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh = toy_model()
    state = checkpoint.load_checkpoint(tmp_path, fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]))
    assert state["step"] == 2


def test_loss_falls_and_logs_are_written(tmp_path):
    # A learnable rule: every next token is the current one plus one.
    examples = [{"input_ids": ids, "labels": ids} for ids in
                ([(s + k) % VOCAB for k in range(10)] for s in range(32))]
    out = train(toy_model(), examples, examples[:8], args(batch_size=8, epochs=6, lr=3e-2, log_every=1),
                task="causal-lm", out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] < 0.5 * losses[0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"eval_loss"' in l]) == 6  # one evaluation per epoch
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
