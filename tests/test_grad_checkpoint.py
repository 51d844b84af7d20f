"""minilora.models.grad_checkpoint against torch.utils.checkpoint(use_reentrant=False) and
against no checkpointing: the same gradients (dropout included), intermediates freed
after the forward, a second backward with retain_graph, and no torch._dynamo import."""

import gc
import subprocess
import sys

import pytest
import torch

from minilora.fast.dropout import Dropout
from minilora.models.grad_checkpoint import checkpoint


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.drop, self.torch_drop = Dropout(0.3), torch.nn.Dropout(0.2)

    def forward(self, x, scale):
        h = torch.tanh(self.a(x))
        return self.torch_drop(self.b(self.drop(h))) * scale + x


def _grads(run, seed=3):
    block = Block().train()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(seed)
    out = run(block, x)
    out.square().sum().backward()
    return [x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("oracle", ["none", "torch"])
def test_same_gradients_as_no_checkpoint_and_as_torch(oracle):
    ours = _grads(lambda m, x: checkpoint(m, x, 2.0))
    if oracle == "none":
        want = _grads(lambda m, x: m(x, 2.0))
    else:
        from torch.utils.checkpoint import checkpoint as torch_checkpoint
        want = _grads(lambda m, x: torch_checkpoint(m, x, 2.0, use_reentrant=False))
    for got, ref in zip(ours, want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # The dropout masks were really redrawn identically: another seed gives other gradients.
    assert not torch.equal(_grads(lambda m, x: checkpoint(m, x, 2.0), seed=4)[1], ours[1])


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _big(x):
    return x.repeat(50, 1).exp().sum(0)  # exp keeps its 200 MB result for the backward


def test_intermediates_are_freed_after_the_forward():
    # Blocks this large are mmapped by malloc and unmapped on free: RSS follows what is alive.
    x = torch.randn(1000, 1000, requires_grad=True)
    grown = {}
    for name, run in (("checkpoint", lambda: checkpoint(_big, x)), ("plain", lambda: _big(x))):
        gc.collect()
        before = _rss_mb()
        out = run()
        grown[name] = _rss_mb() - before
        out.sum().backward()
        del out
    assert grown["plain"] > 150 and grown["checkpoint"] < 50, grown


def test_recomputed_activations_do_not_pile_up_across_blocks():
    # Six checkpointed blocks, each keeping a 40 MB tanh result for its backward. The
    # backward reruns them last to first; a block's recomputed tensors must be gone
    # by the time the next one reruns, or RSS climbs by 40 MB a block.
    rss_at_rerun = []

    def block(h):
        rss_at_rerun.append(_rss_mb())
        return torch.tanh(h) * 1.5

    h = torch.randn(10_000, 1_000, requires_grad=True)
    for _ in range(6):
        h = checkpoint(block, h)
    rss_at_rerun.clear()
    h.sum().backward()
    assert len(rss_at_rerun) == 6
    assert rss_at_rerun[-1] - rss_at_rerun[0] < 100, rss_at_rerun


def test_retain_graph_backward_twice():
    block = Block().eval()
    x = torch.randn(4, 16, requires_grad=True)
    out = checkpoint(block, x, 1.0).sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_no_grad_just_runs():
    block = Block().eval()
    with torch.no_grad():
        out = checkpoint(block, torch.randn(2, 16), 1.0)
    assert out.grad_fn is None


def test_a_rerun_that_saves_other_tensors_is_an_error():
    calls = []

    def unstable(x):
        calls.append(1)
        return x.exp() if len(calls) == 1 else x * 2  # exp saves its result; x * 2 saves nothing

    x = torch.randn(3, requires_grad=True)
    out = checkpoint(unstable, x)
    with pytest.raises(RuntimeError, match="same ops"):
        out.sum().backward()


def test_checkpointing_imports_no_dynamo():
    script = ("import sys, torch\nfrom minilora.models.grad_checkpoint import checkpoint\n"
              "x = torch.randn(4, requires_grad=True)\ncheckpoint(torch.exp, x).sum().backward()\n"
              "print('torch._dynamo' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_enable_sets_every_checkpointable_module_and_rejects_bad_frequencies():
    from minilora.models.grad_checkpoint import enable

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gradient_checkpointing, self.checkpoint_every = False, 1
            self.body = torch.nn.Linear(2, 2)  # no flag: left alone

    model = Model()
    assert enable(model, every=2) == 1
    assert model.gradient_checkpointing is True and model.checkpoint_every == 2
    assert enable(torch.nn.Linear(2, 2)) == 0  # nothing to checkpoint: the caller decides what to say
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            enable(model, every=bad)


def test_config_checkpoints_one_layer_in_n(tmp_path):
    from tiny_models import tiny_llama

    from minilora.train.config import config_from_dict
    from minilora.train.run import _load

    tiny_llama().save_pretrained(tmp_path / "m")
    cfg = config_from_dict({"model": {"path": str(tmp_path / "m"), "gradient_checkpointing": True,
                                      "checkpoint_every": 2}, "data": {"train_file": "t"}})
    model = _load(cfg, None)
    assert model.gradient_checkpointing is True and model.checkpoint_every == 2


def test_kept_values_come_back_in_the_rerun_instead_of_being_computed():
    from minilora.models.grad_checkpoint import kept_for_rerun

    computed = []

    def block(x):
        # A value the block could make again; here it counts how often it is made.
        w = kept_for_rerun(lambda: computed.append(1) or torch.full((3,), 2.0), pack=lambda t: t * 10,
                           unpack=lambda t: t / 10)
        return (x * w).exp()  # exp saves its output, x * w saves w

    x = torch.randn(3, requires_grad=True)
    out = checkpoint(block, x).sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)  # a second backward runs the block again
    want = 2.0 * (2.0 * x.detach()).exp()
    torch.testing.assert_close(g1, want, rtol=0, atol=0)
    torch.testing.assert_close(g2, want, rtol=0, atol=0)
    assert computed == [1]  # made once, by the first run
    kept_for_rerun(lambda: computed.append(1))  # outside any block: just computed
    assert computed == [1, 1]


def test_a_rerun_that_asks_for_other_kept_values_is_an_error():
    from minilora.models.grad_checkpoint import kept_for_rerun

    runs = []

    def unstable(x):
        runs.append(1)
        for _ in range(1 if len(runs) == 1 else 2):
            kept_for_rerun(lambda: 1.0)
        return x.exp()

    x = torch.randn(3, requires_grad=True)
    out = checkpoint(unstable, x)
    with pytest.raises(RuntimeError, match="more kept values than the first run kept"):
        out.sum().backward()
