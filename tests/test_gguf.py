"""GGUF reader, dequantizers and the GGUF -> HF Llama importer.

Oracles: per-block Python loops written here from the format description; a tiny GGUF
writer written here; transformers' own GGUF reader/dequantizer for the real SmolLM2
file; and transformers' LlamaForCausalLM loading the converted folder and answering.
"""

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.gguf import dequant as hf_dequant
from transformers.integrations.gguf import reader as hf_reader

from helpers_smollm import smollm2_gguf_path, smollm2_hf_dir
from minilora.io.gguf import GGUFError, GGUFReader, dequantize
from minilora.io.gguf_import import import_gguf, unpermute_qk
from minilora.io.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------
# A tiny GGUF writer, independent of minilora.io.gguf (its own type table and layout).

FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
       10: "<Q", 11: "<q", 12: "<d"}
STR, ARR = 8, 9


def enc_value(vtype, value):
    if vtype == STR:
        b = value.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if vtype == ARR:  # value = (element type, items)
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(enc_value(etype, v) for v in items)
    return struct.pack(FMT[vtype], value)


def write_gguf(kvs, tensors, version=3, alignment=32):
    """kvs: [(key, vtype, value)]; tensors: [(name, dims ne0-first, ggml_type, raw bytes)]."""
    if alignment != 32:
        kvs = kvs + [("general.alignment", 4, alignment)]
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += enc_value(STR, key) + struct.pack("<I", vtype) + enc_value(vtype, value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += raw
    for (name, dims, gtype, _), off in zip(tensors, offsets):
        out += enc_value(STR, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype, off)
    return out + b"\0" * (-len(out) % alignment) + data


# ---------------------------------------------------------------------------------
# Random blocks and per-block reference dequantizers (plain loops, one value at a time).

def random_blocks(rng, gtype, n_blocks):
    # Finite fp16 scale(s) (d, and m for Q4_1), then random quant bytes.
    n_scales, n_quants = {8: (1, 32), 2: (1, 16), 3: (2, 16)}[gtype]
    return b"".join(rng.uniform(-2, 2, n_scales).astype(np.float16).tobytes()
                    + rng.integers(0, 256, n_quants).astype(np.uint8).tobytes()
                    for _ in range(n_blocks))


def half(b):
    return np.float32(struct.unpack("<e", b)[0])


def ref_dequant(raw, gtype):
    if gtype in (0, 1):
        fmt = "<f" if gtype == 0 else "<e"
        return np.array([np.float32(v) for (v,) in struct.iter_unpack(fmt, raw)], np.float32)
    out, size = [], {8: 34, 2: 18, 3: 20}[gtype]
    for start in range(0, len(raw), size):
        blk = raw[start:start + size]
        vals = [None] * 32
        if gtype == 8:
            d = half(blk[0:2])
            for i, q in enumerate(struct.unpack("<32b", blk[2:])):
                vals[i] = d * np.float32(q)
        elif gtype == 2:
            d = half(blk[0:2])
            for j in range(16):
                vals[j] = np.float32((blk[2 + j] & 0x0F) - 8) * d
                vals[j + 16] = np.float32((blk[2 + j] >> 4) - 8) * d
        elif gtype == 3:
            d, m = half(blk[0:2]), half(blk[2:4])
            for j in range(16):
                vals[j] = np.float32(blk[4 + j] & 0x0F) * d + m
                vals[j + 16] = np.float32(blk[4 + j] >> 4) * d + m
        out.extend(vals)
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("gtype", [8, 2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_block_dequantizers_match_reference_loops(gtype, seed):
    rng = np.random.default_rng(seed)
    raw = random_blocks(rng, gtype, n_blocks=int(rng.integers(1, 40)))
    ours = dequantize(np.frombuffer(raw, np.uint8), gtype)
    np.testing.assert_array_equal(ours, ref_dequant(raw, gtype))


@pytest.mark.parametrize("gtype, dtype", [(0, np.float32), (1, np.float16)])
def test_float_types_match_reference(gtype, dtype):
    x = np.random.default_rng(0).standard_normal(100).astype(dtype)
    np.testing.assert_array_equal(dequantize(np.frombuffer(x.tobytes(), np.uint8), gtype),
                                  ref_dequant(x.tobytes(), gtype))


def test_nibble_order_by_hand():
    # Q4_0 with d = 0.5: byte 0 = 0x9A -> element 0 = (0xA - 8) * .5 = 1, element 16 = (9 - 8) * .5
    blk = np.float16(0.5).tobytes() + bytes([0x9A]) + bytes(15)
    vals = dequantize(np.frombuffer(blk, np.uint8), 2)
    assert vals[0] == 1.0 and vals[16] == 0.5 and vals[1] == -4.0
    # Q4_1 with d = 2, m = -1: byte 0 = 0x31 -> element 0 = 1*2-1 = 1, element 16 = 3*2-1 = 5
    blk = np.float16(2).tobytes() + np.float16(-1).tobytes() + bytes([0x31]) + bytes(15)
    vals = dequantize(np.frombuffer(blk, np.uint8), 3)
    assert vals[0] == 1.0 and vals[16] == 5.0 and vals[1] == -1.0


def test_unsupported_type_error_lists_supported():
    with pytest.raises(GGUFError, match=r"Q4_K.*supported types: F32 \(0\), F16 \(1\), Q4_0"):
        dequantize(np.zeros(144, np.uint8), 12)


# ---------------------------------------------------------------------------------
# A small valid file: metadata of every type, tensors of every supported type.

KVS = [
    ("general.architecture", STR, "llama"), ("u8", 0, 200), ("i8", 1, -5), ("u16", 2, 60000),
    ("i16", 3, -300), ("u32", 4, 4_000_000_000), ("i32", 5, -2_000_000_000), ("f32", 6, 1.5),
    ("flag", 7, True), ("name", STR, "héllo ✓"), ("u64", 10, 2**63 + 5), ("i64", 11, -2**62),
    ("f64", 12, 1 / 3), ("ids", ARR, (4, [1, 2, 3])), ("words", ARR, (STR, ["a", "", "Ġthe"])),
    ("bools", ARR, (7, [True, False])), ("nested", ARR, (ARR, [(1, [-1, 2]), (1, [])])),
    ("empty", ARR, (5, [])),
]
PLAIN_KVS = {k: ([v[1] for v in val[1]] if k == "nested" else val[1]) if t == ARR else val
             for k, t, val in KVS}


def small_tensors(rng):
    return [
        ("a.f32", (4, 3), 0, rng.standard_normal(12).astype(np.float32).tobytes()),
        ("b.f16", (5,), 1, rng.standard_normal(5).astype(np.float16).tobytes()),
        ("c.q8", (64, 2), 8, random_blocks(rng, 8, 4)),
        ("d.q40", (32, 3), 2, random_blocks(rng, 2, 3)),
        ("e.q41", (32, 1, 2), 3, random_blocks(rng, 3, 2)),
    ]


def small_file(version=3, alignment=32):
    return write_gguf(KVS, small_tensors(np.random.default_rng(0)), version, alignment)


@pytest.mark.parametrize("version, alignment", [(3, 32), (2, 32), (3, 64), (3, 1)])
def test_round_trip(tmp_path, version, alignment):
    path = tmp_path / "small.gguf"
    path.write_bytes(small_file(version, alignment))
    with GGUFReader(path) as r:
        assert r.version == version and r.alignment == alignment
        meta = {k: v for k, v in r.metadata.items() if k != "general.alignment"}
        assert meta == PLAIN_KVS
        assert r.metadata_types["words"] == (9, 8) and r.metadata_types["u64"] == 10
        assert list(r.tensors) == [t[0] for t in small_tensors(np.random.default_rng(0))]
        for name, dims, gtype, raw in small_tensors(np.random.default_rng(0)):
            info = r.tensors[name]
            assert info.dims == dims and info.shape == tuple(reversed(dims))
            assert info.ggml_type == gtype and info.offset % alignment == 0
            assert r.raw(name).tobytes() == raw
            x = r.tensor(name)
            assert x.shape == tuple(reversed(dims)) and x.dtype == np.float32
            np.testing.assert_array_equal(x.reshape(-1), ref_dequant(raw, gtype))


def test_reader_accepts_bytes_and_empty_file(tmp_path):
    assert GGUFReader(small_file()).metadata["name"] == "héllo ✓"
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        GGUFReader(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError):
        GGUFReader(tmp_path / "missing.gguf")


def header(n_tensors=0, n_kv=1, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def tensor_file(dims, gtype=0, offset=0, raw=b"\0" * 64):
    name = enc_value(STR, "t")
    info = name + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype, offset)
    out = header(1, 0) + info
    return out + b"\0" * (-len(out) % 32) + raw


@pytest.mark.parametrize("blob, message", [
    (b"GGML" + bytes(20), "bad magic"),
    (b"GG", "truncated"),
    (header(version=1), "unsupported GGUF version 1"),
    (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian"),
    (header(n_kv=2**40), "absurd counts"),
    (header(n_tensors=2**62, n_kv=0), "absurd counts"),
    (header() + struct.pack("<Q", 2**60) + b"key", "truncated.*key"),
    (header() + enc_value(STR, "k") + struct.pack("<IIQ", 9, 4, 2**61), "array length"),
    (header() + enc_value(STR, "k") + struct.pack("<IIQ", 9, 8, 10**9), "array length"),
    (header() + enc_value(STR, "k") + struct.pack("<I", 13), "unknown metadata value type 13"),
    (header() + enc_value(STR, "k") + struct.pack("<II", 9, 77) + bytes(8), "array element type 77"),
    (header() + enc_value(STR, "k") + struct.pack("<I", 9)
     + b"".join(struct.pack("<IQ", 9, 1) for _ in range(20)),
     "nested"),
    (header() + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), "UTF-8"),
    (header(n_kv=2) + 2 * (enc_value(STR, "k") + struct.pack("<IB", 0, 1)), "duplicate metadata"),
    (header() + enc_value(STR, "general.alignment") + struct.pack("<II", 4, 24), "power-of-two"),
    (header() + enc_value(STR, "general.alignment") + struct.pack("<IQ", 10, 32), "power-of-two"),
    (tensor_file((2**40, 2**40)), "larger than the whole"),
    (tensor_file((2**63, 2**63, 2**63, 2**63)), "larger than the whole"),
    (tensor_file((17,)), "runs past the end"),
    (tensor_file((4,), offset=2**63), "runs past the end"),
    (tensor_file((4,), offset=4), "not a multiple of the alignment"),
    (tensor_file((4,), gtype=99), "unknown ggml type 99.*known types: F32"),
    (tensor_file((33,), gtype=8), "not a multiple of the Q8_0 block size"),
    (tensor_file(()), "0 dims"),
    (tensor_file((1, 1, 1, 1, 1)), "5 dims"),
])
def test_corrupt_files_raise_named_errors(blob, message):
    with pytest.raises(GGUFError, match=message):
        GGUFReader(blob)


def test_unsupported_tensor_type_is_readable_but_not_dequantizable():
    r = GGUFReader(tensor_file((256,), gtype=12, raw=bytes(144)))
    assert r.tensors["t"].type_name == "Q4_K"
    with pytest.raises(GGUFError, match="Q4_K.*supported types"):
        r.tensor("t")


def test_every_truncation_fails_cleanly():
    blob = small_file()
    for n in range(len(blob)):
        with pytest.raises(GGUFError):
            GGUFReader(blob[:n])


def parse_and_read(blob):
    """Parse, then dequantize every tensor; GGUFError is the only allowed exception."""
    try:
        r = GGUFReader(blob)
        for name in r.tensors:
            r.tensor(name)
    except GGUFError:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = small_file()


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(blob):
    parse_and_read(blob)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_after_valid_header(tail):
    parse_and_read(b"GGUF" + struct.pack("<I", 3) + tail)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.lists(st.tuples(st.integers(0, len(VALID) - 8),
                          st.sampled_from([0, 1, 31, 2**31, 2**32 - 1, 2**63, 2**64 - 1])),
                max_size=2),
       st.integers(0, len(VALID)))
def test_fuzz_mutated_valid_file(byte_edits, word_edits, length):
    blob = bytearray(VALID)
    for pos, value in byte_edits:
        blob[pos] = value
    for pos, value in word_edits:  # big numbers where counts, lengths and offsets live
        blob[pos:pos + 8] = struct.pack("<Q", value)
    parse_and_read(bytes(blob[:length]))


# ---------------------------------------------------------------------------------
# A synthetic llama GGUF (2 layers, byte-level vocab) for importer paths SmolLM2 lacks.

def byte_alphabet():
    # GPT-2's printable stand-ins for the 256 bytes, written out from its definition.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def tiny_llama(tmp_path, arch="llama", extra_tensor=None, with_output=True, extra_kvs=(), norm_type=0):
    """A tiny llama GGUF; `norm_type` is output_norm's GGML type (0: F32; 30, BF16, is not decodable)."""
    rng = np.random.default_rng(1)
    hidden, ffn, heads, kv, layers = 64, 96, 4, 2, 2
    tokens = ["<s>", "</s>"] + byte_alphabet() + ["Ġt", "Ġth"]
    kvs = [("general.architecture", STR, arch), ("llama.block_count", 4, layers),
           ("llama.context_length", 4, 256), ("llama.embedding_length", 4, hidden),
           ("llama.feed_forward_length", 4, ffn), ("llama.attention.head_count", 4, heads),
           ("llama.attention.head_count_kv", 4, kv), ("llama.rope.freq_base", 6, 10000.0),
           ("llama.attention.layer_norm_rms_epsilon", 6, 1e-6),
           ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "smollm"),
           ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
           ("tokenizer.ggml.token_type", ARR, (5, [3, 3] + [1] * (len(tokens) - 2))),
           ("tokenizer.ggml.merges", ARR, (STR, ["Ġ t", "Ġt h"])),
           ("tokenizer.ggml.bos_token_id", 4, 0), ("tokenizer.ggml.eos_token_id", 4, 1),
           *extra_kvs]
    kvs = list({key: (key, vtype, value) for key, vtype, value in kvs}.values())  # an extra kv replaces its namesake

    def f32(*dims):
        return rng.standard_normal(int(np.prod(dims))).astype(np.float32).tobytes()

    tensors = [("token_embd.weight", (hidden, len(tokens)), 0, f32(hidden, len(tokens))),
               ("output_norm.weight", (hidden,), norm_type, f32(hidden) if norm_type == 0 else bytes(2 * hidden))]
    if with_output:
        tensors.append(("output.weight", (hidden, len(tokens)), 8,
                        random_blocks(rng, 8, hidden * len(tokens) // 32)))
    for i in range(layers):
        for name, dims in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden // heads * kv)),
                           ("attn_v", (hidden, hidden // heads * kv)), ("attn_output", (hidden, hidden)),
                           ("ffn_gate", (hidden, ffn)), ("ffn_up", (hidden, ffn)),
                           ("ffn_down", (ffn, hidden))]:
            tensors.append((f"blk.{i}.{name}.weight", dims, 3, random_blocks(rng, 3, dims[0] * dims[1] // 32)))
        tensors += [(f"blk.{i}.attn_norm.weight", (hidden,), 0, f32(hidden)),
                    (f"blk.{i}.ffn_norm.weight", (hidden,), 0, f32(hidden))]
    if extra_tensor:
        tensors.append(extra_tensor)
    path = tmp_path / f"tiny-{arch}.gguf"
    path.write_bytes(write_gguf(kvs, tensors))
    return path


def llama_cpp_permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf.py permute (the forward direction).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_tiny_llama(tmp_path, dtype):
    gguf = tiny_llama(tmp_path)
    out = import_gguf(gguf, tmp_path / "hf", dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2
    assert cfg["head_dim"] == 16 and cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == 260
    sd = load_file(out / "model.safetensors")
    assert len(sd) == 3 + 2 * 9 and all(t.dtype == dtype for t in sd.values())
    r = GGUFReader(gguf)
    for hf_name, name in [("lm_head", "output"), ("model.layers.1.mlp.down_proj", "blk.1.ffn_down"),
                          ("model.layers.0.self_attn.v_proj", "blk.0.attn_v")]:
        assert torch.equal(sd[f"{hf_name}.weight"], torch.from_numpy(r.tensor(f"{name}.weight")).to(dtype))
    for proj, heads in (("q", 4), ("k", 2)):  # rows permuted back, so permuting again restores GGUF
        w = sd[f"model.layers.0.self_attn.{proj}_proj.weight"].float().numpy()
        gguf_w = torch.from_numpy(r.tensor(f"blk.0.attn_{proj}.weight")).to(dtype).float().numpy()
        np.testing.assert_array_equal(llama_cpp_permute(w, heads), gguf_w)
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings is False
    tok = load_tokenizer(out)
    # Digits split first (" the ", "1", "2"), then ByteLevel: "Ġthe" -> "Ġt"+"h" -> "Ġth", "e"; "Ġ".
    # Byte b has id 2 + b in this vocabulary.
    ids = tok.encode(" the 12")
    assert ids == [259, 2 + ord("e"), 2 + ord(" "), 2 + ord("1"), 2 + ord("2")]
    assert tok.decode(ids) == " the 12"


def test_import_tied_and_bos_adding_tokenizer(tmp_path):
    gguf = tiny_llama(tmp_path, with_output=False, extra_kvs=[("tokenizer.ggml.add_bos_token", 7, True)])
    out = import_gguf(gguf, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    ours, hf = load_tokenizer(out), AutoTokenizer.from_pretrained(out)
    for text in ("the 12", "<s> x </s>", ""):
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text)[0] == 0  # <s>, added by the tokenizer.json template
    assert ours.encode("<s>") == [0, 0]  # control tokens match whole, never split into bytes
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)


def test_import_rejects_other_architectures_and_unknown_tensors(tmp_path):
    with pytest.raises(GGUFError, match="architecture 'qwen2' is not supported; supported: \\('llama',\\)"):
        import_gguf(tiny_llama(tmp_path, arch="qwen2"), tmp_path / "a")
    extra = ("rope_freqs.weight", (8,), 0, bytes(32))
    with pytest.raises(GGUFError, match="rope_freqs.weight.*known names"):
        import_gguf(tiny_llama(tmp_path, extra_tensor=extra), tmp_path / "b")


# ---------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1/Q8_0 file.

def test_smollm2_matches_transformers_gguf_reader():
    path = str(smollm2_gguf_path())
    ours = GGUFReader(path)
    meta, names = hf_reader.read_gguf_metadata(path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    assert list(ours.tensors) == list(names)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.rope.freq_base",
                "tokenizer.chat_template", "llama.attention.head_count_kv"):
        assert ours.metadata[key] == meta[key]
    theirs = hf_reader.load_gguf_state_dict(hf_reader.GgufHeader.from_file(path))
    # One tensor of each stored type, plus a layer from the middle.
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.17.attn_q.weight",
                 "blk.29.ffn_down.weight", "output_norm.weight"):
        info, raw = ours.tensors[name], theirs[name][None]
        ref = raw.float() if info.ggml_type == 0 else hf_dequant.dequantize(
            raw.reshape(-1), info.ggml_type).reshape(info.shape)
        assert torch.equal(torch.from_numpy(ours.tensor(name)), ref), name


def test_smollm2_import_config_and_weights():
    out = smollm2_hf_dir()
    cfg = json.loads((out / "config.json").read_text())
    expect = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
              "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
              "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert {k: cfg[k] for k in expect} == expect
    sd = load_file(out / "model.safetensors")
    assert len(sd) == 2 + 30 * 9 and "lm_head.weight" not in sd
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.layers.3.self_attn.k_proj.weight"].shape == (192, 576)
    r = GGUFReader(smollm2_gguf_path())
    for name, heads in (("q", 9), ("k", 3)):
        ours = sd[f"model.layers.5.self_attn.{name}_proj.weight"].numpy()
        np.testing.assert_array_equal(llama_cpp_permute(ours, heads), r.tensor(f"blk.5.attn_{name}.weight"))
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == r.metadata["tokenizer.chat_template"]
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tcfg["add_bos_token"] is False


def test_smollm2_generates_paris():
    out = smollm2_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([ours.encode(prompt)])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                             do_sample=False)
    answer = ours.decode(gen[0, ids.shape[1]:])
    assert "Paris" in answer, answer
