"""models/checkpointed_attention.py against F.scaled_dot_product_attention without
checkpointing (float64, grouped-query heads, causal and padded masks): the same output
and gradients, and a checkpoint re-run that takes the attention back instead of
computing it again."""

import pytest
import torch
import torch.nn.functional as F

import minilora.models.checkpointed_attention as kept_attention
from minilora.grad_checkpoint import checkpoint


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8)]  # 4 query heads share 2 kv heads
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def _padded_mask():
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    allowed[0, :, :2] = False  # row 0 left-padded by two: its first two queries see nothing
    return allowed[:, None]


def _run(attend, mask, weights):
    q, k, v = _qkv()
    out = attend(q, k, v, mask)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_checkpointed_attention_matches_sdpa_and_is_not_recomputed(masked, scale, monkeypatch):
    mask = _padded_mask() if masked else None
    weights = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _run(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, is_causal=m is None, scale=scale, enable_gqa=True), mask, weights)

    calls = []
    real = kept_attention._attend_cpu
    monkeypatch.setattr(kept_attention, "_attend_cpu", lambda *a: calls.append(1) or real(*a))

    def block(q, k, v, m):
        out = kept_attention.scaled_dot_product_attention(q, k, v, m, is_causal=m is None, scale=scale,
                                                          enable_gqa=True)
        return out * 1.0  # the block's own output, so the kernel's is not handed straight back

    got = _run(lambda q, k, v, m: checkpoint(block, q, k, v, m), mask, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert calls == [1]  # the first run's; the re-run took O and the log-sum-exp back
    if masked:
        assert (got[0][0, :, :2] == 0).all()  # queries with nothing to attend give zeros, as in SDPA

    # Outside a checkpointed block it is F.scaled_dot_product_attention itself.
    plain = _run(lambda q, k, v, m: kept_attention.scaled_dot_product_attention(
        q, k, v, m, is_causal=m is None, scale=scale, enable_gqa=True), mask, weights)
    assert calls == [1]
    for g, w in zip(plain, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
