"""The fast pieces for our models (minilora/fast/: dropout, attention, unpad,
linear_ce, rerun) against the plain models they install on: same state, the same
computation (bit for bit where the test says so, else to the stated tolerance; for
dropout, the same mask gives the same output and gradients), installed once, in any
order. (That the plain models import nothing of minilora.fast or minilora.train is
tests/test_layout.py's check, for every teaching subpackage.)"""

import copy

import pytest
import torch
from torch import nn

import minilora.fast
from minilora import LoraConfig, inject
from minilora.fast import attention, dropout, linear_ce, rerun, unpad
from minilora.models.bert import BertConfig, BertForSequenceClassification
from minilora.models.distilbert import DistilBertConfig, DistilBertForSequenceClassification
from minilora.models.grad_checkpoint import checkpoint
from minilora.models.llama import LlamaForCausalLM
from test_models_llama_gpt2 import build_pair, padded_batch

MODEL_PIECES = ["dropout", "attention", "unpad", "linear_ce", "rerun", "rms_norm"]


def tiny_encoder(family: str, p: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=40, max_position_embeddings=16, hidden_dropout_prob=p,
                         attention_probs_dropout_prob=p, initializer_range=0.3)  # fmt: skip
        return BertForSequenceClassification(cfg)
    cfg = DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=40, max_position_embeddings=16,
                           dropout=p, attention_dropout=p, seq_classif_dropout=p, initializer_range=0.3)  # fmt: skip
    return DistilBertForSequenceClassification(cfg)


def encoder_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask, torch.tensor([0, 1, 1])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["bert", "distilbert", "llama_gqa", "gpt2"])
def test_enable_keeps_the_state_and_installs_once(case):
    model = tiny_encoder(case) if case in ("bert", "distilbert") else build_pair(case)[1]
    inject(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = minilora.fast.enable(model, MODEL_PIECES)
    assert sum(first.values()) > 0
    assert minilora.fast.enable(model, MODEL_PIECES) == dict.fromkeys(MODEL_PIECES, 0)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for m in model.modules():
        if isinstance(m, minilora.LoRALinear):  # LoRA's dropout is fast/lora_layer.py's, not ours
            assert all(type(a.lora_dropout) is nn.Dropout for a in m.adapters.values())
    if case == "gpt2":  # GPT-2 keeps torch's dropout, as it always had
        assert first["dropout"] == 0 and first["linear_ce"] == 1
    if case == "bert":  # embeddings, 2 exits a layer, classifier; 2 attentions; the encoder
        assert first["dropout"] == 6 and first["attention"] == 2 and first["unpad"] == 3


@pytest.mark.parametrize("order", [["attention", "unpad"], ["unpad", "attention"]])
def test_attention_and_unpad_install_in_either_order(order):
    model = tiny_encoder("distilbert")
    minilora.fast.enable(model, order)
    assert type(model.distilbert) is unpad.RealTokenDistilBertModel
    for layer in model.distilbert.transformer.layer:
        assert type(layer.attention) is unpad.RealTokenByteMaskMultiHeadSelfAttention


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fast_encoder_without_dropout_equals_plain(family):
    # Dropout 0: the byte masks draw nothing, and the real-token layout changes only the
    # rows each matmul sees (fp32 rounding of a different blocking, hence 1e-5).
    ids, mask, labels = encoder_batch()
    plain = tiny_encoder(family, p=0.0).train()
    fast = copy.deepcopy(plain)
    minilora.fast.enable(fast, MODEL_PIECES)
    results = []
    for model in (plain, fast):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits, grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_byte_mask_dropout_with_torch_mask_equals_nn_dropout(monkeypatch):
    # p = 0.25 is a multiple of 2^-16, so the byte mask's scale is torch's 1 / (1 - p).
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 40)
    plain = nn.Dropout(0.25).train()
    torch.manual_seed(4)
    y_plain = plain(x)
    (gx_plain,) = torch.autograd.grad(y_plain, x, g)
    keep = y_plain != 0
    fast = nn.Dropout(0.25).train()
    wrapper = nn.Module()
    wrapper.dropout = fast
    assert dropout.install(wrapper) == 0  # only our encoders' dropouts are swapped
    assert minilora.fast.swap_class(fast, nn.Dropout, dropout.Dropout)
    monkeypatch.setattr(dropout, "dropout_keep_mask", lambda shape, p, device: keep.clone())
    y_fast = fast(x)
    (gx_fast,) = torch.autograd.grad(y_fast, x, g)
    torch.testing.assert_close(y_fast, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(gx_fast, gx_plain, rtol=0, atol=0)


def test_byte_mask_attention_module_equals_plain_without_dropout_and_keeps_bytes_with_it():
    model = tiny_encoder("bert", p=0.0)
    plain = model.bert.encoder.layer[0].attention.self
    fast = copy.deepcopy(plain)
    assert attention.install(fast) == 1
    h = torch.randn(2, 5, 32)
    assert torch.equal(fast(h, None), plain(h, None))  # dropout 0: SDPA on both paths
    fast.dropout_p = 0.2
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fast.train()(h.requires_grad_(), None)
    assert torch.bool in {t.dtype for t in kept}


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_fast_decoder_equals_plain(case):
    # Eval logits bit for bit (RMSNorm's forward is the same ops); the loss-only forward's
    # loss and every gradient to fp32 rounding (the analytic RMSNorm backward, the chunked
    # head), through a LoRA model as the trainer runs it.
    _, plain = build_pair(case)
    inject(plain, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    fast = copy.deepcopy(plain)
    minilora.fast.enable(fast, MODEL_PIECES)
    ids, mask, labels = padded_batch("right")
    with torch.no_grad():
        assert torch.equal(fast.eval()(ids, attention_mask=mask).logits, plain.eval()(ids, attention_mask=mask).logits)
    results = []
    for model in (plain, fast):
        out = model(ids, attention_mask=mask, labels=labels, return_logits=False)
        out.loss.backward()
        results.append((out, grads(model)))
    (p_out, p_grads), (f_out, f_grads) = results
    assert p_out.logits is not None and f_out.logits is None  # plain builds the logits anyway
    torch.testing.assert_close(f_out.loss, p_out.loss, rtol=1e-6, atol=1e-6)
    assert p_grads.keys() == f_grads.keys() and p_grads
    for name, g in p_grads.items():
        torch.testing.assert_close(f_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_linear_ce_piece_alone():
    _, model = build_pair("llama_gqa")
    assert linear_ce.install(model) == 1
    assert type(model) is linear_ce.FusedLossLlamaForCausalLM
    assert isinstance(model, LlamaForCausalLM)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_forward_for_saved_tensors_saves_what_forward_saves(dora):
    torch.manual_seed(0)
    layer = minilora.LoRALinear(nn.Linear(16, 24), r=4, alpha=8, use_dora=dora)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 7, 16, requires_grad=True)
    runs, rows = [], []
    layer.base_layer.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    for run in (layer, lambda t: rerun.lora_forward_for_saved_tensors(layer, t)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            run(x)
        runs.append(kept)
    assert len(runs[0]) == len(runs[1]) > 0
    for full, skipped in zip(*runs):
        assert torch.equal(full, skipped)
    assert rows[1] == (7 if dora else 1)  # DoRA reads W0 x, so it runs in full


def test_rerun_piece_skips_the_down_projection_and_keeps_the_gradients():
    _, model = build_pair("llama_gqa")
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    ids, mask, labels = padded_batch("right")
    model.train().gradient_checkpointing = True
    results = []
    for fast in (False, True):
        if fast:
            assert rerun.install(model) == len(model.model.layers)
        rows = []
        hook = model.model.layers[0].mlp.down_proj.base_layer.register_forward_pre_hook(
            lambda m, args: rows.append(args[0].shape[-2]))
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        hook.remove()
        results.append(grads(model))
        assert rows == ([12, 12] if not fast else [12, 1])  # forward, then the re-run
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, rtol=1e-6, atol=1e-8, msg=name)
    # Inside a larger checkpointed block the layer's output is used: it runs in full.
    rows = []
    model.model.layers[0].mlp.down_proj.base_layer.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[-2]))
    model.gradient_checkpointing = False
    checkpoint(lambda i: model(i, attention_mask=mask, labels=labels).loss, ids).backward()
    assert rows == [12, 12]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"]])
def test_rerun_piece_trains_a_batch_of_one_sequence(targets):
    # A batch of one: F.linear on one row of it saved another shape than on the whole, and
    # every checkpointed backward failed ("t() expects a tensor with <= 2 dimensions").
    _, model = build_pair("llama_gqa")
    inject(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    ids, mask, labels = (t[:1] for t in padded_batch("right"))
    model.train().gradient_checkpointing = False
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    plain = grads(model)
    rerun.install(model)
    model.gradient_checkpointing = True
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-5, atol=1e-7, msg=name)
