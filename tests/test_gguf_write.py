"""The GGUF writer (minilora/io/gguf_write.py) read back by llama.cpp's own gguf-py
(the oracle) and by our reader: every metadata type, f32/f16/bf16/Q8_0 tensors, the
alignment of each tensor, the file written atomically."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

from minilora.io import gguf
from minilora.io.gguf_write import GGUFWriter


def _write(path, alignment=32):
    w = GGUFWriter(path, alignment=alignment)
    w.add_string("general.architecture", "llama")
    w.add_string("general.name", "tiny ünïcödé")
    w.add_uint32("llama.block_count", 2)
    w.add_int32("test.negative", -7)
    w.add_uint64("test.big", 2**40 + 3)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bé"], gguf.STRING)
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25], gguf.FLOAT32)
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1], gguf.INT32)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 64, generator=g)
    norm = torch.randn(5, generator=g)
    half = torch.randn(2, 7, generator=g).half()
    bf = torch.randn(4, 3, generator=g).bfloat16()
    q8 = bytes(range(34)) * 6  # 3 x 64 values: six Q8_0 blocks of 34 bytes
    w.add_tensor("blk.0.attn_q.weight", (3, 64), gguf.F32, lambda: weight.numpy().tobytes())
    w.add_tensor("output_norm.weight", (5,), gguf.F32, lambda: norm.numpy().tobytes())
    w.add_tensor("half", (2, 7), gguf.F16, lambda: half.numpy().tobytes())
    w.add_tensor("bf", (4, 3), 30, lambda: bf.view(torch.int16).numpy().tobytes())
    w.add_tensor("q8", (3, 64), gguf.Q8_0, lambda: q8)
    w.write()
    return {"blk.0.attn_q.weight": weight, "output_norm.weight": norm, "half": half, "bf": bf, "q8": q8}


@pytest.mark.parametrize("alignment", [32, 64])
def test_gguf_py_reads_what_we_write(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    tensors = _write(path, alignment)
    reader = GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.name"].contents() == "tiny ünïcödé"
    assert fields["llama.block_count"].types == [GGUFValueType.UINT32]
    assert fields["llama.block_count"].contents() == 2
    assert fields["test.negative"].contents() == -7 and fields["test.big"].contents() == 2**40 + 3
    assert fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "bé"]
    assert fields["tokenizer.ggml.scores"].contents() == [0.0, -1.5, 2.25]
    assert fields["tokenizer.ggml.token_type"].contents() == [3, 1, 1]
    if alignment != 32:
        assert fields["general.alignment"].contents() == alignment
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name) == list(tensors)
    for t in reader.tensors:
        assert t.data_offset % alignment == 0
    assert list(by_name["blk.0.attn_q.weight"].shape) == [64, 3]  # ggml order
    np.testing.assert_array_equal(by_name["blk.0.attn_q.weight"].data, tensors["blk.0.attn_q.weight"].numpy())
    np.testing.assert_array_equal(by_name["output_norm.weight"].data, tensors["output_norm.weight"].numpy())
    np.testing.assert_array_equal(by_name["half"].data, tensors["half"].numpy())
    assert by_name["q8"].data.tobytes() == tensors["q8"]
    assert by_name["bf"].data.tobytes() == tensors["bf"].view(torch.int16).numpy().tobytes()


def test_our_reader_reads_what_we_write(tmp_path):
    path = tmp_path / "m.gguf"
    tensors = _write(path)
    with gguf.GGUFReader(path) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "bé"]
        assert f.metadata["llama.block_count"] == 2 and f.metadata_types["llama.block_count"] == gguf.UINT32
        assert f.tensors["blk.0.attn_q.weight"].shape == (3, 64)
        assert np.array_equal(f.tensor("blk.0.attn_q.weight"), tensors["blk.0.attn_q.weight"].numpy())
        assert np.array_equal(f.tensor("half"), tensors["half"].float().numpy())
        assert f.raw("q8").tobytes() == tensors["q8"]


def test_bad_tensors_are_refused_and_nothing_is_left_behind(tmp_path):
    w = GGUFWriter(tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match="Q8_0 row must be a multiple of 32 values, got 40"):
        w.add_tensor("x", (2, 40), gguf.Q8_0, lambda: b"")
    w.add_tensor("y", (2, 4), gguf.F32, lambda: b"\0" * 8)  # 8 bytes where 32 are needed
    with pytest.raises(ValueError, match="y: 8 bytes given, its shape and type need 32"):
        w.write()
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary
    with pytest.raises(ValueError, match="set twice"):
        w.add_uint32("k", 1)
        w.add_uint32("k", 2)


def test_q8_0_bytes_equal_the_reference_quantizer():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from minilora.io.gguf_write import q8_0_bytes

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-3, 2, 6)[:, None]
    x[1, :32] = 0.0  # a zero block: d = 0, q = 0
    x[2, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # d = 1: exact halves to round
    x[3, 32:64] = 127.0 / 2 ** torch.arange(32)  # exact powers of two
    want = quantize(x.numpy(), GGMLQuantizationType.Q8_0).tobytes()
    assert q8_0_bytes(x) == want
    assert q8_0_bytes(x.bfloat16()) == quantize(x.bfloat16().float().numpy(), GGMLQuantizationType.Q8_0).tobytes()
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_0_bytes(torch.zeros(2, 40))
