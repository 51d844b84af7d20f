"""`minilora export-gguf` checked with llama.cpp's own gguf-py (no llama.cpp build needed).

gguf-py is the Python side of llama.cpp: its writer's named methods (add_context_length,
add_head_count_kv, ...) say which key and which value type llama.cpp reads for each
hyper-parameter, its MODEL_TENSORS table lists the tensor names each architecture's
graph loads, and its Q8_0 quantizer is the reference. The running model is checked
against llama.cpp itself in test_gguf_llamacpp.py (make test-interop).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minilora
from helpers_gguf import MIXED_TEXT, tiny_folder
from helpers_smollm import smollm2_hf_dir
from minilora import LoraConfig, inject, save_adapter
from minilora.io.gguf_arch import ExportError, permute_qk
from minilora.io.gguf_export import export_gguf, export_lora_gguf
from minilora.io.gguf_import import import_gguf, unpermute_qk
from minilora.io.tokenizer import load_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILIES = {  # name: (family, pre-tokenizer, config overrides)
    "llama3": ("llama", "llama-bpe", dict(head_dim=32, rope_scaling=LLAMA3_ROPE)),
    "llama_tied_linear": ("llama", "gpt-2", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("mistral", "smollm", dict(sliding_window=4096, attention_bias=True)),  # transformers ignores it
    "qwen2": ("qwen2", "qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", "qwen2", dict(head_dim=24)),
}


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    fam, pre, overrides = FAMILIES[request.param]
    folder = tiny_folder(tmp_path_factory.mktemp(request.param), fam, pre, **overrides)
    return request.param, folder


def gguf_py_hyperparameters(path, arch: str, config) -> dict:
    """The same hyper-parameters written through gguf-py's named methods, read back."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(int(config.head_dim * config.partial_rotary_factor))
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return {k: v for k, v in fields(path).items() if k.startswith(arch + ".")}


def test_hyperparameter_keys_and_types_are_gguf_pys(family, tmp_path):
    name, folder = family
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    ours = fields(out)
    arch = ours["general.architecture"][1]
    assert arch == {"mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}.get(name, "llama")
    config = minilora.load_model(folder, task="causal-lm").config
    ref = gguf_py_hyperparameters(tmp_path / "ref.gguf", arch, config)
    mine = {k: v for k, v in ours.items() if k.startswith(arch + ".")}
    assert mine.keys() == ref.keys()
    for key, (types, value) in ref.items():
        assert mine[key][0] == types, key
        assert mine[key][1] == pytest.approx(value), key


def test_tensor_names_are_the_architectures_own(family, tmp_path):
    name, folder = family
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    arch_name = fields(out)["general.architecture"][1]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = minilora.load_model(folder, task="causal-lm").config.num_hidden_layers
    allowed = set()
    for t in gguf.MODEL_TENSORS[arch]:
        pattern = gguf.TENSOR_NAMES[t]
        for bid in range(n_layers):
            allowed |= {pattern.format(bid=bid) + ".weight", pattern.format(bid=bid) + ".bias"}
    names = set(tensors(out))
    assert names <= allowed, names - allowed
    tied = FAMILIES[name][2].get("tie_word_embeddings", False)
    assert ("output.weight" in names) == (not tied)  # llama.cpp reuses token_embd when output is absent
    assert ("rope_freqs.weight" in names) == (name == "llama3")


def test_llama3_rope_factors_are_the_wavelength_bands(tmp_path):
    """rope_freqs holds, per frequency, plain / scaled: 1 (short), factor (long), in between (smooth)."""
    folder = tiny_folder(tmp_path / "l3", "llama", "llama-bpe", head_dim=32, rope_scaling=LLAMA3_ROPE)
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    factors = tensors(out)["rope_freqs.weight"].data
    d, base, old = 32, 10000.0, 64
    for i, f in enumerate(factors):
        wavelen = 2 * math.pi * base ** (2 * i / d)
        if wavelen < old / 4:
            assert f == pytest.approx(1.0)
        elif wavelen > old:
            assert f == pytest.approx(8.0)
        else:
            smooth = (old / wavelen - 1) / 3
            assert f == pytest.approx(1 / ((1 - smooth) / 8 + smooth), rel=1e-5)


def test_permutation_is_the_inverse_of_the_importers():
    w = torch.randn(4 * 2 * 8, 5)
    back = unpermute_qk(permute_qk(w, 4).numpy(), 4)
    assert np.array_equal(back, w.numpy())
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_tensor_types_and_bytes(tmp_path, out_type):
    folder = tiny_folder(tmp_path / "qwen3", "qwen3", "qwen2", head_dim=24, intermediate_size=80)
    out = export_gguf(folder, tmp_path / "m.gguf", out_type=out_type)
    weights = load_file(folder / "model.safetensors")
    for name, t in tensors(out).items():
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}.get(name)
        if hf is None:
            layer, part = name.split(".")[1:3]
            hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                  "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}[part]
            hf = f"model.layers.{layer}.{hf}.weight"
        w = weights[hf].float()
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(t.data, w.numpy())
        elif out_type == "q8_0" and w.shape[-1] % 32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16  # ffn_down's 80-value rows: no Q8_0 blocks
        elif out_type == "q8_0":
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(t.data).reshape(-1), ref.reshape(-1))
        elif out_type == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(np.asarray(t.data).reshape(w.shape), w.half().numpy())
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            raw = np.asarray(t.data).view(np.uint16).reshape(w.shape)
            assert np.array_equal(raw, w.bfloat16().view(torch.uint16).numpy())
    assert fields(out)["general.file_type"][1] == {"f16": 1, "bf16": 32, "q8_0": 7}[out_type]


def test_vocabulary_matches_the_tokenizer(family, tmp_path):
    name, folder = family
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    f = {k: v[1] for k, v in fields(out).items()}
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == FAMILIES[name][1]
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 640  # the embedding's rows; the tokenizer has 600
    for token, i in spec["model"]["vocab"].items():
        assert tokens[i] == token
    assert [types[i] for i in (0, 1, 2)] == [3, 3, 3] and types[100] == 1 and types[639] == 5
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == load_tokenizer(folder).chat_template_text()


def test_mistral_sliding_window_is_noted(tmp_path):
    folder = tiny_folder(tmp_path / "m", "mistral", "gpt-2", sliding_window=64)
    said = []
    export_gguf(folder, tmp_path / "m.gguf", log=said.append)
    assert any("no sliding window; past 64 tokens" in line for line in said)


def test_add_bos_follows_the_post_processor(tmp_path):
    folder = tiny_folder(tmp_path / "l3", "llama", "llama-bpe", add_bos=True)
    assert load_tokenizer(folder).encode("hi")[0] == 0
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    assert fields(out)["tokenizer.ggml.add_bos_token"][1] is True


def test_f32_round_trip_through_import_is_bit_exact(tmp_path):
    """SmolLM2 exported as f32 and imported again: every safetensors tensor bit for bit, same ids."""
    folder = smollm2_hf_dir()
    out = export_gguf(folder, tmp_path / "smol.gguf", out_type="f32")
    back = import_gguf(out, tmp_path / "back")
    a, b = load_file(folder / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert load_tokenizer(back).encode(MIXED_TEXT) == load_tokenizer(folder).encode(MIXED_TEXT)
    assert (tmp_path / "smol.Modelfile").read_text() == "FROM ./smol.gguf\n"


def trained_adapter(folder, path, seed=0, **lora):
    """An adapter with B != 0: random A and B, as a few training steps would leave them."""
    model = minilora.load_model(folder, task="causal-lm")
    inject(model, LoraConfig(**{"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"],
                                **lora}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, path)
    return path


def test_merged_export_holds_w0_plus_s_ba(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "llama-bpe")
    adapter = trained_adapter(folder, tmp_path / "adapter")
    out = export_gguf(folder, tmp_path / "m.gguf", adapter=adapter, out_type="f32")
    model = minilora.load_model(folder, task="causal-lm")
    minilora.load_adapter(model, adapter)
    layer = model.model.layers[1].self_attn.k_proj
    expected = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    got = torch.from_numpy(unpermute_qk(np.asarray(tensors(out)["blk.1.attn_k.weight"].data), 2).copy())
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora", [{}, {"rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3.0}}])
def test_lora_only_file_rebuilds_the_merged_weights(tmp_path, lora):
    """W0 + (alpha/r)·B·A from the adapter file, as llama.cpp computes it, equals the merged export."""
    folder = tiny_folder(tmp_path / "l", "llama", "llama-bpe")
    adapter = trained_adapter(folder, tmp_path / "adapter", **lora)
    merged = tensors(export_gguf(folder, tmp_path / "m.gguf", adapter=adapter, out_type="f32"))
    base = tensors(export_gguf(folder, tmp_path / "b.gguf", out_type="f32"))
    out = export_lora_gguf(folder, adapter, tmp_path / "a.gguf")
    f = {k: v[1] for k, v in fields(out).items()}
    assert (f["general.type"], f["adapter.type"], f["general.architecture"]) == ("adapter", "lora", "llama")
    alpha = f["adapter.lora.alpha"]
    assert alpha == pytest.approx(8.0 * (2.0 if lora.get("rslora") else 1.0))  # rsLoRA: alpha/sqrt(r) = 16/4
    lora_t = tensors(out)
    assert len(lora_t) == 2 * 7 * 2
    for name in base:
        if name + ".lora_a" not in lora_t:
            continue
        a = np.asarray(lora_t[name + ".lora_a"].data, dtype=np.float64)
        b = np.asarray(lora_t[name + ".lora_b"].data, dtype=np.float64)
        assert b.shape[1] == a.shape[0]  # rank = lora_b's ne[0], as llama.cpp reads it
        w = np.asarray(base[name].data, dtype=np.float64) + alpha / a.shape[0] * b @ a
        np.testing.assert_allclose(w, np.asarray(merged[name].data), rtol=0, atol=1e-5)
    assert (tmp_path / "a.Modelfile").read_text() == f"FROM {folder.resolve()}\nADAPTER ./a.gguf\n"


def test_nf4_base_is_dequantized_then_merged(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "llama-bpe")
    nf4 = minilora.quantize_folder(folder, tmp_path / "nf4", blocksize=64)
    adapter = trained_adapter(folder, tmp_path / "adapter")
    said = []
    out = export_gguf(nf4, tmp_path / "m.gguf", adapter=adapter, out_type="f32", log=said.append)
    assert any("NF4" in line and "dequantized" in line for line in said)
    model = minilora.load_model(nf4, task="causal-lm")
    minilora.load_adapter(model, adapter)
    layer = model.model.layers[0].mlp.up_proj
    expected = layer.base_layer.dequantize(torch.float32) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    got = torch.from_numpy(np.asarray(tensors(out)["blk.0.ffn_up.weight"].data).copy())
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6)


# -- errors a user can cause ----------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / "minilora"), "export-gguf", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_unknown_architecture_names_the_exportable_ones(tmp_path):
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(folder)
    with pytest.raises(ExportError, match=r"model_type 'gpt2'.*exportable: llama, mistral, phi3, qwen2, qwen3"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_unknown_pre_tokenizer_says_what_was_found_and_to_pass_pre(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "gpt-2")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r"found .*Whitespace.*--pre NAME"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    out = export_gguf(folder, tmp_path / "m.gguf", pre="gpt-2")
    assert fields(out)["tokenizer.ggml.pre"][1] == "gpt-2"
    r = run_cli(folder, tmp_path / "n.gguf")
    assert r.returncode == 2 and "--pre NAME" in r.stderr and len(r.stderr.strip().splitlines()) == 1


PHI3 = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None, partial_rotary_factor=0.75, tie_word_embeddings=True,
            original_max_position_embeddings=16, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [2.0 + 0.5 * i for i in range(6)],
                "original_max_position_embeddings": 16})


def test_phi3_keys_and_tensors(tmp_path):
    """Fused qkv and gate_up kept fused, partial rotary in rope.dimension_count, LongRoPE's
    factors as rope_factors_long/short and its attention factor; names from gguf-py's phi3 list."""
    folder = tiny_folder(tmp_path / "p", "phi3", "spm_phi3", **PHI3)
    said = []
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32", log=said.append)
    f = {k: v[1] for k, v in fields(out).items()}
    assert f["general.architecture"] == "phi3" and f["phi3.rope.dimension_count"] == 12
    assert f["phi3.rope.scaling.original_context_length"] == 16
    config = minilora.load_model(folder, task="causal-lm").config
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(config.rope_scaling["attention_factor"])
    t = tensors(out)
    allowed = {gguf.TENSOR_NAMES[k].format(bid=b) + ".weight" for k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.PHI3]
               for b in range(2)}
    assert set(t) <= allowed and {"blk.0.attn_qkv.weight", "blk.1.ffn_up.weight"} <= set(t)
    weights = load_file(folder / "model.safetensors")
    assert np.array_equal(np.asarray(t["blk.1.ffn_up.weight"].data),
                          weights["model.layers.1.mlp.gate_up_proj.weight"].numpy())
    assert np.allclose(t["rope_factors_long.weight"].data, [2.0 + 0.5 * i for i in range(6)])
    assert np.allclose(t["rope_factors_short.weight"].data, [1.0 + 0.1 * i for i in range(6)])
    assert any("long factors at every position" in line for line in said)


def test_phi3_needs_its_endoftext_and_a_sentencepiece_tokenizer(tmp_path):
    folder = tiny_folder(tmp_path / "p", "phi3", "spm", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    with pytest.raises(ExportError, match="phi3 graph looks up the token <\\|endoftext\\|>"):
        export_gguf(folder, tmp_path / "m.gguf")
    folder = tiny_folder(tmp_path / "b", "phi3", "gpt-2")
    with pytest.raises(ExportError, match="byte-level BPE tokenizer \\(Phi-4-mini's kind\\)"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_qwen3_with_biases_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "q", "qwen3", "qwen2", attention_bias=True)
    with pytest.raises(ExportError, match="'qwen3' graph has no place for them"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_sentencepiece_style_vocabulary(tmp_path):
    """Llama 2's layout: scores that make llama.cpp merge in HF's merge order, byte and
    unknown token types, the "▁" prefix, <s> added; no merges and no pre-tokenizer name."""
    folder = tiny_folder(tmp_path / "l2", "llama", "spm", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    f = {k: v[1] for k, v in fields(out).items()}
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.pre" not in f and "tokenizer.ggml.merges" not in f
    types, scores, tokens = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.tokens"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and tokens[3 + 0x41] == "<0x41>"
    assert set(types[259:600]) == {1} and set(types[600:]) == {5}
    merged = [left + right for left, right in spec["model"]["merges"]]
    for rank, token in enumerate(merged[:50]):
        if merged.index(token) == rank:
            assert scores[spec["model"]["vocab"][token]] == -rank
    assert f["tokenizer.ggml.add_space_prefix"] is True and f["tokenizer.ggml.add_bos_token"] is True
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"]) \
        == (1, 2, 0)
    with pytest.raises(ExportError, match="leave out --pre"):
        export_gguf(folder, tmp_path / "n.gguf", pre="gpt-2")


def test_wordpiece_tokenizer_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "gpt-2")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="a WordPiece tokenizer; GGUF export writes BPE tokenizers"):
        export_gguf(folder, tmp_path / "m.gguf")


def test_adapter_for_another_base_is_refused(tmp_path):
    small = tiny_folder(tmp_path / "small", "llama", "gpt-2")
    wide = tiny_folder(tmp_path / "wide", "llama", "gpt-2", hidden_size=96)
    adapter = trained_adapter(wide, tmp_path / "adapter")
    for call in (lambda: export_gguf(small, tmp_path / "m.gguf", adapter=adapter),
                 lambda: export_lora_gguf(small, adapter, tmp_path / "a.gguf")):
        with pytest.raises(ValueError, match="trained on a model of another size"):
            call()
    assert not list(tmp_path.glob("*.gguf"))


def test_lora_only_refuses_what_llama_cpp_adapters_cannot_hold(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "gpt-2")
    dora = trained_adapter(folder, tmp_path / "dora", use_dora=True)
    with pytest.raises(ExportError, match="DoRA.*leave out --lora-only"):
        export_lora_gguf(folder, dora, tmp_path / "a.gguf")
    r = run_cli(folder, tmp_path / "a.gguf", "--lora-only")
    assert r.returncode == 2 and "--adapter" in r.stderr


def test_f16_overflow_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "l", "llama", "gpt-2")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    from safetensors.torch import save_file

    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="float16's range.*bf16 or f32"):
        export_gguf(folder, tmp_path / "m.gguf", out_type="f16")
    export_gguf(folder, tmp_path / "m.gguf", out_type="bf16")
