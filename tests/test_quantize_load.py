"""Quantize on load, bitsandbytes 4-bit folders, and quantize_folder, against transformers + bitsandbytes.

The oracle folder is made the way users make one: transformers quantizes a tiny
Llama with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") on the
CPU (bitsandbytes 0.50 has a CPU backend, and transformers 5 accepts
device_map="cpu" for 4-bit), then save_pretrained writes it. No patching needed.

Two bitsandbytes CPU quirks shape the comparisons (both outside minilora):
- Linear4bit.forward on an AVX512-BF16 CPU, in eval mode without gradients,
  repacks the weight once and multiplies in bf16 (~1e-3 off an fp32 product, and
  the packed bytes no longer dequantize with the public API). `fp32_bnb` turns that
  fast path off so bitsandbytes computes dequantize + fp32 matmul, what we compare.
- Its CPU dequantize_4bit kernel is wrong when a row's length is not a multiple
  of the blocksize (see test_nf4_bnb.py); the tiny models here keep every
  in_features a multiple of 64, and the weights are also checked against
  bitsandbytes' generic torch path.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
import transformers
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from minilora import LoraConfig, inject
from minilora.io.loading import load_model
from minilora.lora.layer import LoRALinear
from minilora.qlora.nf4 import quantize_nf4
from minilora.qlora.nf4_linear import NF4Linear
from minilora.qlora.quantize import nf4_module_names
from minilora.qlora.quantize_folder import quantize_folder
from helpers_smollm import smollm2_hf_dir
from tiny_models import batch

ROOT = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
_generic_dequant = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)


def tiny_llama_dir(path: Path, seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    cfg.update(overrides)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # copied by quantize_folder
    return path


def bnb_config(double_quant=True, compute=torch.float32):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute)  # fmt: skip


def fp32_bnb(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see the module docstring
    return model


def hf_4bit(path, cls=AutoModelForCausalLM, **kwargs):
    return fp32_bnb(cls.from_pretrained(path, device_map="cpu", **kwargs))


def bnb_dequantize(param, public=True):
    """bitsandbytes' dequantization of a Params4bit: its generic path, and its public API
    (which must agree) where rows are whole blocks, outside the CPU kernel's bug."""
    state = param.quant_state
    scales = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    generic = _generic_dequant(param.data.view(-1), scales, state.code, state.blocksize, state.shape, state.dtype)
    if public:
        assert torch.equal(bnbF.dequantize_4bit(param.data, state), generic)
    return generic


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def orig_dir(tmp_path_factory):
    # Biases on q/k/v/o, untied head: every kind of tensor a Llama block can hold.
    return tiny_llama_dir(tmp_path_factory.mktemp("orig") / "llama", attention_bias=True)


@pytest.fixture(scope="module")
def bnb_dir(orig_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bnb") / "llama-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(orig_dir, quantization_config=bnb_config(), device_map="cpu") \
        .save_pretrained(out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ours_4bit(orig_dir):
    return load_model(orig_dir, quantize="nf4")


def test_transformers_4bit_folder_loads_with_identical_weights_and_logits(bnb_dir):
    config = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    theirs = hf_4bit(bnb_dir)
    ours = load_model(bnb_dir)  # no quantize argument: the folder says it is 4-bit
    quantized = {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 2 * len(BLOCK_LINEARS)
    for name in quantized:
        mine, bnb_layer = ours.get_submodule(name), theirs.get_submodule(name)
        assert torch.equal(mine.dequantize(), bnb_dequantize(bnb_layer.weight)), name
        assert mine.weight.double_quant and mine.compute_dtype == torch.float32  # from bnb_4bit_compute_dtype
        if bnb_layer.bias is not None:
            assert torch.equal(mine.bias, bnb_layer.bias), name
    assert type(ours.lm_head) is nn.Linear and torch.equal(ours.lm_head.weight, theirs.lm_head.weight)
    assert torch.equal(ours.model.embed_tokens.weight, theirs.model.embed_tokens.weight)
    inputs = batch()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_quantize_folder_writes_what_transformers_writes(orig_dir, bnb_dir, ours_4bit, tmp_path):
    out = quantize_folder(orig_dir, tmp_path / "q")
    mine, theirs = load_file(out / "model.safetensors"), load_file(bnb_dir / "model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key, t in theirs.items():
        assert mine[key].dtype == t.dtype and torch.equal(mine[key], t), key
    cfg_mine = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg_theirs = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert list(cfg_mine) == list(cfg_theirs)
    # transformers leaves the skip list empty and recomputes it on load; we name the head.
    assert cfg_mine.pop("llm_int8_skip_modules") == ["lm_head"]
    cfg_theirs.pop("llm_int8_skip_modules")
    assert cfg_mine == cfg_theirs
    assert (out / "tokenizer_config.json").read_text() == (orig_dir / "tokenizer_config.json").read_text()
    assert (out / "generation_config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporaries left

    inputs = batch()
    from_folder = logits(load_model(out), inputs)
    assert torch.equal(from_folder, logits(ours_4bit, inputs))  # same bytes, same arithmetic
    torch.testing.assert_close(logits(hf_4bit(out), inputs), from_folder, rtol=1e-5, atol=1e-5)


def _shard(src: Path, dst: Path, second) -> Path:
    """A copy of a single-file folder with the keys for which second(key) is true in a second shard."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for key, t in tensors.items():
        shards[f"model-0000{1 + bool(second(key))}-of-00002.safetensors"][key] = t
    for name, part in shards.items():
        save_file(part, dst / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_4bit_folder_and_sharded_input(bnb_dir, orig_dir, ours_4bit, tmp_path):
    # A weight's companion tensors in another shard than its packed bytes: each is read from its own file.
    sharded_4bit = _shard(bnb_dir, tmp_path / "sharded-4bit", lambda k: "absmax" in k or "quant_state" in k)
    sharded = _shard(orig_dir, tmp_path / "sharded", lambda k: "mlp" in k)
    inputs = batch()
    want = logits(ours_4bit, inputs)
    assert torch.equal(logits(load_model(sharded_4bit), inputs), want)
    assert torch.equal(logits(load_model(sharded, quantize="nf4"), inputs), want)
    out = quantize_folder(sharded, tmp_path / "q")
    assert not (out / "model.safetensors.index.json").exists()  # one file out
    assert torch.equal(logits(load_model(out), inputs), want)


def test_quantize_on_load_bytes_and_what_stays_in_full_precision(orig_dir, ours_4bit):
    sd = load_file(orig_dir / "model.safetensors")
    quantized = {n for n, m in ours_4bit.named_modules() if isinstance(m, NF4Linear)}
    assert quantized == {f"model.layers.{i}.{p}" for i in range(2) for p in BLOCK_LINEARS}
    for name in quantized:
        layer = ours_4bit.get_submodule(name)
        want = quantize_nf4(sd[name + ".weight"]).to_bnb_state_dict()
        got = layer.weight.to_bnb_state_dict()
        assert list(got) == list(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
        if layer.bias is not None:  # biases: the checkpoint's values, frozen, in the compute dtype
            assert torch.equal(layer.bias, sd[name + ".bias"]) and not layer.bias.requires_grad
    assert ours_4bit.model.layers[0].self_attn.q_proj.bias is not None
    assert type(ours_4bit.lm_head) is nn.Linear and type(ours_4bit.model.embed_tokens) is nn.Embedding
    for key, value in ours_4bit.state_dict().items():
        if key in sd and value.dtype == torch.float32:  # embeddings, norms, head, biases: untouched
            assert torch.equal(value, sd[key]), key

    half = load_model(orig_dir, quantize="nf4", compute_dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == half.lm_head.weight.dtype == torch.bfloat16
    assert half.model.norm.weight.dtype == half.model.layers[1].self_attn.k_proj.bias.dtype == torch.bfloat16
    q = half.model.layers[0].mlp.up_proj
    assert q.compute_dtype == torch.bfloat16
    assert torch.equal(q.weight.packed, ours_4bit.model.layers[0].mlp.up_proj.weight.packed)
    assert logits(half, batch()).dtype == torch.bfloat16


def test_blocksize_and_single_quantization_options(orig_dir, tmp_path):
    model = load_model(orig_dir, quantize="nf4", blocksize=128, double_quant=False)
    sd = load_file(orig_dir / "model.safetensors")
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.blocksize == 128 and not w.double_quant
    assert torch.equal(w.absmax, quantize_nf4(sd["model.layers.1.mlp.down_proj.weight"], 128, False).absmax)
    out = quantize_folder(orig_dir, tmp_path / "q", blocksize=128, double_quant=False)
    inputs = batch()
    assert torch.equal(logits(load_model(out), inputs), logits(model, inputs))
    # Rows of 64 values in blocks of 128 are where bitsandbytes' CPU kernel goes wrong, so
    # its forward is no oracle here: compare what it loaded, through its generic path.
    theirs = hf_4bit(out)
    for name, layer in theirs.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            assert layer.weight.quant_state.blocksize == 128 and not layer.weight.quant_state.nested
            assert torch.equal(bnb_dequantize(layer.weight, public=False), model.get_submodule(name).dequantize())


def test_tied_embeddings_stay_tied_and_in_full_precision(tmp_path):
    folder = tiny_llama_dir(tmp_path / "tied", seed=3, tie_word_embeddings=True)
    model = load_model(folder, quantize="nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in nf4_module_names(model) and type(model.lm_head) is nn.Linear
    out = quantize_folder(folder, tmp_path / "q")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # stored once, as transformers does
    again = load_model(out)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    inputs = batch()
    torch.testing.assert_close(logits(hf_4bit(out), inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_bf16_checkpoint_quantizes_the_same_on_load_and_into_a_folder(tmp_path):
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    on_load = load_model(tmp_path / "bf16", quantize="nf4")
    w = on_load.model.layers[0].self_attn.o_proj.weight
    assert w.dtype == torch.bfloat16 and on_load.model.embed_tokens.weight.dtype == torch.bfloat16
    out = quantize_folder(tmp_path / "bf16", tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    inputs = batch()
    assert torch.equal(logits(load_model(out), inputs), logits(on_load, inputs))
    theirs = hf_4bit(out)
    for name, layer in theirs.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            assert layer.weight.quant_state.dtype == torch.bfloat16
            assert torch.equal(bnb_dequantize(layer.weight), on_load.get_submodule(name).dequantize())
    torch.testing.assert_close(logits(theirs, inputs), logits(on_load, inputs), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_load_onto_cuda_matches_cpu(orig_dir, bnb_dir, ours_4bit):
    gpu = load_model(orig_dir, quantize="nf4", device="cuda")
    for name, layer in ours_4bit.named_modules():
        if isinstance(layer, NF4Linear):
            w = gpu.get_submodule(name).weight
            assert w.device.type == "cuda" and torch.equal(w.packed.cpu(), layer.weight.packed), name
            # The absmax mean (double quantization's offset) is a reduction: its order may differ by an ulp.
            torch.testing.assert_close(w.dequantize().cpu(), layer.dequantize(), rtol=1e-6, atol=1e-6)
    assert gpu.model.embed_tokens.weight.device.type == "cuda"
    from_folder = load_model(bnb_dir, device="cuda")
    on_gpu = {k: v.cuda() for k, v in batch().items()}
    torch.testing.assert_close(logits(from_folder, on_gpu).cpu(), logits(ours_4bit, batch()), rtol=1e-4, atol=1e-4)


def test_qlora_end_to_end_loss_falls(orig_dir):
    model = load_model(orig_dir, quantize="nf4")
    chosen = inject(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    assert len(chosen) == 2 * len(BLOCK_LINEARS)  # every 4-bit layer, not the head
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in chosen)
    assert all(isinstance(model.get_submodule(n).base_layer, NF4Linear) for n in chosen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(rows=4, length=16, seed=7)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    losses = []
    for _ in range(20):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Only rank-8 adapters learn (on random weights and tokens): a steady fall, not memorisation.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses


def test_gpt2_conv1d_weights_quantize_as_bitsandbytes_stores_them(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=bnb_config(), device_map="cpu")
    theirs.save_pretrained(tmp_path / "gpt2-bnb")
    fp32_bnb(theirs)
    ours = load_model(tmp_path / "gpt2-bnb")
    assert isinstance(ours.transformer.h[0].attn.c_attn, NF4Linear)  # Conv1D (in, out) -> 4-bit (out, in)
    inputs = batch()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), rtol=1e-5, atol=1e-5)
    out = quantize_folder(tmp_path / "gpt2", tmp_path / "q")
    mine, want = load_file(out / "model.safetensors"), load_file(tmp_path / "gpt2-bnb" / "model.safetensors")
    assert sorted(mine) == sorted(want) and all(torch.equal(mine[k], want[k]) for k in want)
    assert torch.equal(logits(load_model(tmp_path / "gpt2", quantize="nf4"), inputs), logits(ours, inputs))


def test_bert_heads_stay_full_precision_and_transformers_agrees(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=3)  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    ours = load_model(tmp_path / "bert", task="sequence-classification", quantize="nf4")
    quantized = {n for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 2 * 6 and all(n.startswith("bert.encoder.layer.") for n in quantized)
    assert type(ours.classifier) is nn.Linear and type(ours.bert.pooler.dense) is nn.Linear
    out = quantize_folder(tmp_path / "bert", tmp_path / "q")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["bert.pooler.dense", "classifier"]
    theirs = hf_4bit(out, transformers.BertForSequenceClassification)
    assert type(theirs.bert.pooler.dense) is nn.Linear  # the skip list is what keeps it so
    inputs = batch()
    from_folder = load_model(out, task="sequence-classification")
    assert torch.equal(logits(from_folder, inputs), logits(ours, inputs))
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), rtol=1e-5, atol=1e-5)


def _with_quantization_config(src: Path, dst: Path, **q) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = q
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("q, message", [
    (dict(quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type="fp4"), "'fp4'.*'nf4' only"),
    (dict(quant_method="bitsandbytes", load_in_4bit=False, load_in_8bit=True), "8-bit"),
    (dict(quant_method="gptq", bits=4), "quant_method 'gptq'"),
    (dict(quant_method="bitsandbytes"), "neither load_in_4bit nor load_in_8bit"),
])  # fmt: skip
def test_unsupported_quantized_folders_are_named(orig_dir, tmp_path, q, message):
    folder = _with_quantization_config(orig_dir, tmp_path / "f", **q)
    with pytest.raises(ValueError, match=message) as info:
        load_model(folder)
    assert "quantize='nf4'" in str(info.value)  # the fix: quantize the original on load


def test_argument_and_folder_mistakes_are_named(orig_dir, bnb_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown quantize='int4'"):
        load_model(orig_dir, quantize="int4")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        load_model(orig_dir, quantize="nf4", blocksize=100)
    with pytest.raises(ValueError, match="compute_dtype applies to 4-bit layers"):
        load_model(orig_dir, compute_dtype="bf16")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_folder(bnb_dir, tmp_path / "again")
    with pytest.raises(ValueError, match="would overwrite its input"):
        quantize_folder(orig_dir, orig_dir)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds other weights"):
        quantize_folder(orig_dir, tmp_path / "stale")
    # config says 4-bit, tensors are not: the folder is incomplete, not silently fp32.
    folder = _with_quantization_config(orig_dir, tmp_path / "plain", **json.loads(
        (bnb_dir / "config.json").read_text())["quantization_config"])  # fmt: skip
    with pytest.raises(ValueError, match="holds no weight.quant_state"):
        load_model(folder)


def test_smollm2_nf4_load_peak_rss_is_under_045_of_fp32():
    """The acceptance check of benchmarks/bench_load.py, each load in a fresh process: quantizing
    as the tensors are read keeps the peak near the 4-bit model (0.36x the fp32 load's peak on
    the reference machine), where holding the fp32 weights first would cost >= 1.0x. The child
    reads its peak as VmHWM, which, unlike ru_maxrss, a child of this big pytest process does not
    inherit, so the margin is real and the check robust."""
    folder = str(smollm2_hf_dir())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    peaks = {}
    for kind in ("float32", "nf4"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--child", "minilora", kind, folder]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        peaks[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_baseline_bytes"]
    assert peaks["nf4"] <= 0.45 * peaks["float32"], peaks
