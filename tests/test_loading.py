"""load_model: folders, shards, dtypes, strictness, new heads, ties and the meta build.

Checkpoints are written by transformers (the oracle) or by hand with safetensors,
then edited to break one thing at a time; each break must be a clear error naming
the key, shapes or path involved.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from minilora import models
from minilora.io.loading import load_model, resolve_dtype

VOCAB = 99


def tiny_bert(cls=transformers.BertForSequenceClassification, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64, initializer_range=0.3)
    kw.update(overrides)
    return cls(transformers.BertConfig(**kw)).eval()


def batch():
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids * mask, mask


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    hf = tiny_bert()
    path = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(path)
    return hf, path


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the folder `src` whose model.safetensors went through `edit(dict)`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def no_meta(model: nn.Module) -> bool:
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------- formats


@torch.no_grad()
def test_sharded_checkpoint_loads_like_transformers(bert_dir, tmp_path):
    hf, _ = bert_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    ours = load_model(tmp_path, task="sequence-classification")
    ids, mask = batch()
    assert rel_err(ours(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits) < 1e-4
    assert no_meta(ours) and not ours.training


def test_missing_shard_names_it(bert_dir, tmp_path):
    bert_dir[0].save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(tmp_path, task="sequence-classification")


@torch.no_grad()
def test_dtype_kept_and_overridden(bert_dir, tmp_path):
    hf, _ = bert_dir
    tiny_bert().to(torch.bfloat16).save_pretrained(tmp_path)  # same seed as hf, not hf itself
    kept = load_model(tmp_path, task="sequence-classification")
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(tmp_path, task="embedding", dtype="auto").parameters()} == {torch.bfloat16}
    for asked, want in [("float32", torch.float32), ("fp16", torch.float16), (torch.float32, torch.float32)]:
        model = load_model(tmp_path, task="sequence-classification", dtype=asked)
        assert {p.dtype for p in model.parameters()} == {want}
    ids, mask = batch()
    assert rel_err(kept(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits) < 0.1


def test_new_heads_take_the_checkpoint_dtype(tmp_path):
    tiny_bert(transformers.BertModel).to(torch.bfloat16).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised"):
        model = load_model(tmp_path, task="sequence-classification")
    assert model.classifier.weight.dtype == torch.bfloat16


def test_resolve_dtype_rejects_unknown_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bf16"):
        resolve_dtype("float8")


def test_pickle_only_folder_is_refused_with_the_conversion_command(bert_dir, tmp_path):
    (tmp_path / "config.json").write_text((bert_dir[1] / "config.json").read_text())
    # Not a valid pickle at all: the loader must refuse without ever opening it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"(?s)pytorch_model\.bin.*safetensors.*save_pretrained"):
        load_model(tmp_path, task="sequence-classification")


def test_missing_folder_config_or_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path, task="embedding")


def test_unknown_model_type_and_task_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="unsupported model_type 't5'.*bert.*distilbert"):
        load_model(tmp_path, task="embedding")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="no task 'causal-lm'.*embedding, sequence-classification"):
        load_model(tmp_path, task="causal-lm")
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        load_model(tmp_path, task="translation")


# --------------------------------------------------------------------------- strictness


def test_missing_tensor_is_listed(bert_dir, tmp_path):
    key = "bert.encoder.layer.1.attention.self.value.weight"
    path = edited_copy(bert_dir[1], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"missing from the checkpoint: {key}"):
        load_model(path, task="sequence-classification")
    with pytest.warns(UserWarning):  # strict=False initialises it and says so
        model = load_model(path, task="sequence-classification", strict=False)
    assert key in model.newly_initialized_keys and no_meta(model)


def test_extra_tensor_is_listed(bert_dir, tmp_path):
    def add(t):
        t["bert.encoder.layer.0.adapter.weight"] = torch.zeros(2, 2)
    path = edited_copy(bert_dir[1], tmp_path / "x", add)
    with pytest.raises(ValueError, match=r"no place in BertForSequenceClassification: bert\.encoder\.layer\.0\.adapter\.weight"):
        load_model(path, task="sequence-classification")


def test_many_problems_are_shortened(bert_dir, tmp_path):
    def drop_layers(t):
        for k in [k for k in t if ".layer." in k]:
            del t[k]
    path = edited_copy(bert_dir[1], tmp_path / "s", drop_layers)
    with pytest.raises(ValueError, match=r"32 model tensors missing.*\.\.\. and 22 more"):
        load_model(path, task="sequence-classification")


def test_wrong_shape_names_key_and_both_shapes(bert_dir, tmp_path):
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    path = edited_copy(bert_dir[1], tmp_path / "w", lambda t: t.update({key: torch.zeros(40, 32)}))
    with pytest.raises(ValueError, match=rf"{key}.*checkpoint \(40, 32\), model \(37, 32\)"):
        load_model(path, task="sequence-classification")


def test_num_labels_from_config_override_and_mismatch(tmp_path):
    tiny_bert(num_labels=3).save_pretrained(tmp_path)
    assert load_model(tmp_path, task="sequence-classification").classifier.out_features == 3
    with pytest.raises(ValueError, match=r"classifier\.bias.*checkpoint \(3,\), model \(5,\).*num_labels"):
        load_model(tmp_path, task="sequence-classification", num_labels=5)
    with pytest.raises(ValueError, match="num_labels applies to task 'sequence-classification'"):
        load_model(tmp_path, task="embedding", num_labels=2)


def test_masked_lm_checkpoint_gets_new_pooler_and_classifier(tmp_path):
    tiny_bert(transformers.BertForMaskedLM).save_pretrained(tmp_path)  # no pooler; cls.* heads
    with pytest.warns(UserWarning, match=r"newly initialised, train them: bert\.pooler\.dense\.weight"):
        model = load_model(tmp_path, task="sequence-classification", num_labels=4)
    assert set(model.newly_initialized_keys) == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert model.classifier.bias.abs().sum() == 0 and no_meta(model)
    assert all(p.requires_grad for p in model.parameters())


def test_legacy_gamma_beta_names_and_int_position_ids(bert_dir, tmp_path):
    def legacy(t):
        for k in [k for k in t if "LayerNorm" in k]:
            t[k.replace(".weight", ".gamma").replace(".bias", ".beta")] = t.pop(k)
        t["bert.embeddings.position_ids"] = torch.arange(64)[None]
    path = edited_copy(bert_dir[1], tmp_path / "g", legacy)
    model = load_model(path, task="sequence-classification")
    ids, mask = batch()
    hf = bert_dir[0]
    with torch.no_grad():
        assert rel_err(model(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits) < 1e-4


# --------------------------------------------------------------------------- generic: ties, buffers


@dataclass
class ToyConfig:
    vocab_size: int = 11
    dim: int = 4
    model_type: str = "toy"

    @classmethod
    def from_hf(cls, d):
        return cls(vocab_size=d["vocab_size"], dim=d["dim"])


class ToyForgetsBuffers(nn.Module):
    """A causal-LM-shaped toy: embedding tied to the head, plus a computed buffer
    that this class never materialises after a meta build."""

    tied_weights = {"lm_head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(config.dim), persistent=False)

    def convert_checkpoint_tensor(self, key, tensor):
        return key, tensor

    def forward(self, ids):
        return self.lm_head(self.embed(ids) * self.scale)


class ToyTiedLM(ToyForgetsBuffers):
    def init_non_persistent_buffers(self, device):
        self.scale = torch.full((self.embed.embedding_dim,), 2.0, device=device)


@pytest.fixture
def toy_family():
    models.register("toy", ToyConfig, {"causal-lm": ToyTiedLM})
    yield
    models.unregister("toy")


def write_toy(path: Path, tensors: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 11, "dim": 4}))
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.mark.parametrize("stored", ["source only", "both", "head only"])
def test_tied_weights_are_filled_once_and_stay_tied(toy_family, tmp_path, stored):
    emb = torch.randn(11, 4)
    tensors = {"source only": {"embed.weight": emb}, "both": {"lm_head.weight": emb, "embed.weight": emb.clone()},
               "head only": {"lm_head.weight": emb}}[stored]
    model = load_model(write_toy(tmp_path / "toy", tensors), dtype="bf16")
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, emb.bfloat16()) and model.newly_initialized_keys == []
    assert torch.equal(model.scale, torch.full((4,), 2.0)) and no_meta(model)


def test_buffer_left_on_meta_is_an_error(tmp_path):
    models.register("toy", ToyConfig, {"causal-lm": ToyForgetsBuffers})
    try:
        with pytest.raises(RuntimeError, match="meta device after loading: scale.*init_non_persistent_buffers"):
            load_model(write_toy(tmp_path / "toy", {"embed.weight": torch.randn(11, 4)}))
    finally:
        models.unregister("toy")


def test_runtime_code_does_not_import_transformers():
    code = ("import sys, minilora.io.loading, minilora.models.bert, minilora.models.distilbert; "
            "bad = [m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
