"""linear_cross_entropy against the oracle, F.cross_entropy(reduction="sum") on the full
logits in float64: loss and gradients for hidden, weight and bias, chunked and not,
with ignored rows, frozen weights, bf16, no_grad, autocast; and a dispatch-level spy
showing the lm-head never sees more than chunk_size rows."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minilora.fast import linear_ce
from minilora.fast.linear_ce import linear_cross_entropy

V, H = 50, 16  # distinct from every row count below, so a (rows, V) shape is unambiguous
TOL = dict(rtol=1e-5, atol=1e-6)


def make_inputs(rows=26, targets=20, dtype=torch.float32, bias=True, seed=0):
    """Random hidden (rows, H), weight (V, H), bias (V,) and labels, all but `targets` rows ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[torch.randperm(rows, generator=g)[: rows - targets]] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, labels, bias=None):
    """The oracle: loss and gradients of F.cross_entropy on full float64 logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = F.linear(h, w, b)
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("chunk_size", [3, 7, 20, 256])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_grads_match_full_logits_reference(chunk_size, with_bias):
    hidden, weight, bias, labels = make_inputs(bias=with_bias)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
    loss.backward()
    ref_loss, ref_h, ref_w, ref_b = reference(hidden, weight, labels, bias)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad.double(), ref_h, **TOL)
    torch.testing.assert_close(weight.grad.double(), ref_w, **TOL)
    assert (hidden.grad[labels == -100] == 0).all()
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), ref_b, **TOL)


def test_all_rows_ignored_gives_zero_loss_that_still_backpropagates_zeros():
    hidden, weight, bias, labels = make_inputs(targets=0)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=4)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    for p in (hidden, weight, bias):
        assert p.grad is not None and p.grad.shape == p.shape and (p.grad == 0).all()
    assert reference(hidden, weight, labels, bias)[0].item() == 0.0


def test_frozen_weight_gets_no_grad_and_hidden_grad_is_unchanged():
    hidden, weight, bias, labels = make_inputs()
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=7).backward()
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(hidden.grad.double(), reference(hidden, weight, labels, bias)[1], **TOL)


def test_batch_by_time_hidden_with_2d_labels_matches_flattened_reference():
    hidden, weight, bias, labels = make_inputs(rows=24, targets=17)
    hidden3d = hidden.detach().reshape(3, 8, H).requires_grad_()
    loss = linear_cross_entropy(hidden3d, weight, labels.reshape(3, 8), bias=bias, chunk_size=5)
    loss.backward()
    ref_loss, ref_h, ref_w, ref_b = reference(hidden3d, weight, labels.reshape(3, 8), bias)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    assert hidden3d.grad.shape == (3, 8, H)
    torch.testing.assert_close(hidden3d.grad.double(), ref_h, **TOL)
    torch.testing.assert_close(weight.grad.double(), ref_w, **TOL)
    torch.testing.assert_close(bias.grad.double(), ref_b, **TOL)


def test_bf16_matches_reference_on_the_same_bf16_inputs():
    hidden, weight, bias, labels = make_inputs(dtype=torch.bfloat16, seed=1)
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=6)
    loss.backward()
    ref_loss, ref_h, ref_w, ref_b = reference(hidden, weight, labels, bias)
    assert loss.dtype == torch.float32
    assert (hidden.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.bfloat16,) * 3
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=0)
    for ours, theirs in [(hidden.grad, ref_h), (weight.grad, ref_w), (bias.grad, ref_b)]:
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_autocast_with_fp32_head_matches_plain_cross_entropy_under_autocast():
    hidden, weight, bias, labels = make_inputs(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden.to(torch.bfloat16), weight, labels, bias=bias, chunk_size=6)
        ref = F.cross_entropy(F.linear(hidden.to(torch.bfloat16), weight, bias).float(), labels, reduction="sum")
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    ref_grads = torch.autograd.grad(ref, [hidden, weight, bias])
    assert [g.dtype for g in grads] == [torch.float32] * 3  # each gradient in its parameter's dtype
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_backward_scales_grads_by_grad_output():
    hidden, weight, bias, labels = make_inputs()
    (linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=7) * 2.5).backward()
    _, ref_h, ref_w, ref_b = reference(hidden, weight, labels, bias)
    torch.testing.assert_close(hidden.grad.double(), 2.5 * ref_h, **TOL)
    torch.testing.assert_close(weight.grad.double(), 2.5 * ref_w, **TOL)
    torch.testing.assert_close(bias.grad.double(), 2.5 * ref_b, **TOL)


class OpSpy(TorchDispatchMode):
    """Records (op name, output shape) for every aten op run under it, autograd's included."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.calls.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out

    def logit_rows(self, ops=None):
        """Row counts of every (rows, V) tensor made, optionally only by the ops named.
        (H, V) is weight.t(), which F.linear makes: a view, not logits."""
        return [s[0] for name, s in self.calls
                if len(s) == 2 and s[1] == V and s != (H, V) and (ops is None or name in ops)]  # fmt: skip

    def matmuls(self):
        return [name for name, _ in self.calls if name in ("mm", "addmm", "addmm_", "matmul", "bmm", "linear")]


def test_lm_head_sees_at_most_chunk_size_rows_and_only_targeted_ones():
    hidden, weight, bias, labels = make_inputs(rows=40, targets=20)
    with OpSpy() as spy:
        linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=6).backward()
    # Forward and backward together: no tensor with more than 6 rows of logits.
    assert max(spy.logit_rows()) <= 6
    # The lm-head matmul ran on the 20 targeted rows only, in four equal chunks
    # (ceil(20 / 6) chunks; 5 rows each rather than 6, 6, 6, 2).
    assert sorted(spy.logit_rows(ops=("mm", "addmm"))) == [5, 5, 5, 5]
    # The spy does catch the unchunked path: plain cross-entropy holds all 40 x V logits.
    with OpSpy() as spy:
        F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction="sum").backward()
    assert max(spy.logit_rows()) == 40


def test_default_chunk_holds_at_most_chunk_logits_numbers(monkeypatch):
    hidden, weight, bias, labels = make_inputs(rows=40, targets=20)
    monkeypatch.setattr(linear_ce, "CHUNK_LOGITS", 8 * V + 3)  # room for 8 rows of logits
    with OpSpy() as spy:
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias)
        loss.backward()
    # ceil(20 / 8) = 3 chunks, evened out to 7, 7, 6 rows (not 8, 8, 4).
    assert sorted(spy.logit_rows(ops=("mm", "addmm"))) == [6, 7, 7]
    want = reference(hidden, weight, labels, bias)[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)


def test_no_grad_returns_same_loss_builds_no_graph_and_skips_gradient_work():
    hidden, weight, bias, labels = make_inputs(rows=40, targets=20)
    with OpSpy() as spy_grad:
        with_grad = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=6)
    with torch.no_grad(), OpSpy() as spy_none:
        without = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=6)
    assert without.grad_fn is None and not without.requires_grad
    torch.testing.assert_close(without, with_grad, rtol=0, atol=0)
    # Only the 4 lm-head matmuls; with grad on, each chunk also does W^T g and g h^T.
    assert len(spy_none.matmuls()) == 4
    assert len(spy_grad.matmuls()) == 12


BAD_INPUTS = {
    "hidden width": (dict(hidden=torch.zeros(4, H + 1)), r"last dimension must be 16"),
    "labels shape": (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels have shape \(5,\).*\(4,\)"),
    "label too big": (dict(labels=torch.tensor([0, 1, V, -100])), r"label 50 is outside \[0, 50\)"),
    "label negative": (dict(labels=torch.tensor([0, -1, 2, 3])), r"label -1 is outside \[0, 50\).*ignore_index=-100"),
    "float labels": (dict(labels=torch.zeros(4)), r"integer token ids.*float32"),
    "weight 1-D": (dict(weight=torch.zeros(V)), r"weight must be \(vocab, hidden\)"),
    "bias shape": (dict(bias=torch.zeros(V - 1)), r"bias has shape \(49,\).*\(50,\)"),
    "chunk size": (dict(chunk_size=0), r"chunk_size must be a positive int"),
    "mixed dtypes": (dict(hidden=torch.zeros(4, H, dtype=torch.bfloat16)), r"must share a dtype"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_problem(case):
    override, message = BAD_INPUTS[case]
    args = dict(hidden=torch.zeros(4, H), weight=torch.zeros(V, H), labels=torch.zeros(4, dtype=torch.long),
                bias=None, chunk_size=2) | override  # fmt: skip
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
