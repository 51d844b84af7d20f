"""Dropout and attention dropout that keep a bool mask (minilora/fast/dropout.py,
minilora/fast/attention.py): against float64 references fed the same mask, by
gradcheck, and by what autograd actually keeps for the backward."""

import pytest
import torch
import torch.nn.functional as F

from minilora.fast.dropout import Dropout, dropout_keep_mask, keep_scale
from minilora.fast.attention import attention


def _same_mask(shape, p, seed):
    torch.manual_seed(seed)
    return ~dropout_keep_mask(shape, p, torch.device("cpu"))


def _reference_attention(q, k, v, mask, dropped, c):
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s + mask
    return (torch.softmax(s, dim=-1) * (~dropped) * c) @ v


def _qkv(b=3, h=2, s=7, d=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_float64_reference_with_the_same_mask(padded):
    q, k, v = _qkv()
    mask = None
    if padded:  # the last two keys of row 1 are padding, as bert.padding_mask builds it
        keep = torch.ones(3, 7, dtype=torch.bool)
        keep[1, 5:] = False
        mask = torch.zeros(3, 1, 1, 7).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    p = 0.3
    torch.manual_seed(5)
    out = attention(q, k, v, mask, p)
    grad = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)

    dropped = _same_mask((3, 2, 7, 7), p, 5)
    assert dropped.any() and not dropped.all()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = _reference_attention(q64, k64, v64, None if mask is None else mask.double(), dropped, keep_scale(p))
    wq, wk, wv = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    for got, ref in ((gq, wq), (gk, wk), (gv, wv)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_attention_passes_gradcheck():
    q, k, v = _qkv(b=2, h=2, s=5, d=3, dtype=torch.float64)

    def f(q, k, v):
        torch.manual_seed(3)  # one mask for every evaluation gradcheck makes
        return attention(q, k, v, None, 0.25)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_attention_without_dropout_is_sdpa():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, None, 0.0), F.scaled_dot_product_attention(q, k, v))


def _saved(fn):
    """fn() and the tensors autograd keeps for its backward."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


def test_attention_keeps_no_float_tensor_per_query_key_pair():
    q, k, v = _qkv(b=2, h=3, s=16, d=8)
    pairs = 2 * 3 * 16 * 16
    _, ours = _saved(lambda: attention(q, k, v, None, 0.1))
    assert [t.dtype for t in ours if t.numel() == pairs] == [torch.bool]
    # What SDPA keeps on CPU with dropout (the graph this replaces): float tensors per pair.
    _, torch_kept = _saved(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
    assert any(t.numel() == pairs and t.is_floating_point() for t in torch_kept)


def test_dropout_matches_reference_and_keeps_a_bool_mask():
    x = torch.randn(40, 30, requires_grad=True)
    layer = Dropout(0.2)
    torch.manual_seed(11)
    y, kept = _saved(lambda: layer(x))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    dropped = _same_mask(x.shape, 0.2, 11)
    c = keep_scale(0.2)
    torch.testing.assert_close(y, x.detach() * (~dropped) * c)
    torch.testing.assert_close(gx, g * (~dropped) * c)
    assert [t.dtype for t in kept] == [torch.bool]
    assert 0.15 < dropped.float().mean() < 0.25


def test_dropout_in_eval_and_at_zero_is_identity():
    x = torch.randn(5, 6)
    assert Dropout(0.0).train()(x) is x
    assert Dropout(0.5).eval()(x) is x
    assert isinstance(Dropout(0.1), torch.nn.Dropout) and Dropout(0.1).p == 0.1


def test_mask_words_are_uniform_16_bit_draws_reproduced_by_torch_seed():
    from minilora.fast.dropout import sfc64_words

    torch.manual_seed(0)
    keep = dropout_keep_mask((512, 1000), 0.5, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(keep, dropout_keep_mask((512, 1000), 0.5, torch.device("cpu")))  # torch's seed decides
    assert not torch.equal(keep, dropout_keep_mask((512, 1000), 0.5, torch.device("cpu")))  # and advances
    words = sfc64_words(12345, 1 << 18)
    assert torch.equal(words, sfc64_words(12345, 1 << 18)) and not torch.equal(words, sfc64_words(12346, 1 << 18))
    # Each 16-bit lane uniform: chi-square over 256 buckets of the top byte, 2^20 draws
    # (255 degrees of freedom: mean 255, sd 22.6; 400 is 6.4 sd out).
    draws = words.view(torch.int16).to(torch.int32) + 2**15
    counts = torch.bincount(draws >> 8, minlength=256).double()
    expected = draws.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum() < 400
    # The four lanes of a word are not copies of each other.
    lanes = words.view(torch.int16).view(-1, 4)
    assert (lanes[:, 0] == lanes[:, 1]).double().mean() < 1e-3


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 64)])
def test_checkpoint_rerun_takes_the_mask_back_instead_of_drawing_it(shape, monkeypatch):
    # The re-run of a checkpointed block gets each mask from the first run, kept at one
    # bit per element, and still moves torch's generator on as a draw would: torch's own
    # dropout after it draws the same noise, so the gradients equal those without checkpointing.
    import minilora.fast.dropout as dropout_module
    from minilora.models.grad_checkpoint import checkpoint

    draws = []
    real = dropout_module.sfc64_words
    monkeypatch.setattr(dropout_module, "sfc64_words", lambda seed, n: draws.append(n) or real(seed, n))
    ours, theirs = Dropout(0.4).train(), torch.nn.Dropout(0.3).train()

    def block(x):
        return theirs(ours(x.sin())).exp()

    grads = []
    for wrap in (False, True):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
        torch.manual_seed(7)
        (checkpoint(block, x) if wrap else block(x)).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert len(draws) == 2  # one per forward; none in the re-run
    assert (grads[0] == 0).any() and (grads[0] != 0).any()


def test_a_rerun_that_asks_for_another_mask_shape_is_an_error():
    from minilora.models.grad_checkpoint import checkpoint

    runs = []

    def unstable(x):
        runs.append(1)
        return Dropout(0.5).train()(x[: 4 if len(runs) == 1 else 3]).exp()

    out = checkpoint(unstable, torch.randn(4, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"\(3, 8\) dropout mask where the first run drew \(4, 8\)"):
        out.sum().backward()
