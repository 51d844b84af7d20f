"""A GGUF v3 writer: metadata and tensors streamed into one file, written atomically.

The layout is the one gguf.py reads (header, metadata, tensor infos, padding, data).
Writing it needs every tensor's size before the first byte of data, since the tensor
infos carry each tensor's offset; the bytes themselves are produced one tensor at a time
(`add_tensor` takes a function that makes them), so a model is never held twice in
memory. Each tensor starts at a multiple of `general.alignment` (32 unless set), counted
from the start of the data section, and the data section itself starts at such a
multiple of the file offset.

Metadata values are typed explicitly (`add_uint32`, `add_float32`, `add_string`,
`add_array`, ...): llama.cpp reads e.g. `llama.block_count` as u32 and refuses another
integer width, so a Python int alone does not say which type to write.

Tensor shapes are given in PyTorch order and written in ggml's, reversed: a weight of
shape (out, in) is ne = (in, out).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write
from .gguf import (
    ARRAY,
    BOOL,
    DEFAULT_ALIGNMENT,
    FLOAT32,
    GGML_TYPES,
    GGUF_MAGIC,
    INT32,
    STRING,
    UINT32,
    UINT64,
    _SCALAR_FMT,
)

VERSION = 3
Q8_0_BLOCK = 32


def q8_0_bytes(x: torch.Tensor) -> bytes:
    """x quantized to Q8_0 as llama.cpp's reference quantizer does (ggml-quants.c), byte for byte.

    Blocks of 32 values along the last dimension, each stored as d (fp16) and 32 int8 q:

        d = max_i |x_i| / 127,    q_i = round(x_i / d)  (halves away from zero; q = 0 where d = 0)

    computed in fp32 with 1/d from the fp32 d, as the reference does, before d is
    rounded to fp16. Dequantized, x_i is d q_i."""
    if x.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {Q8_0_BLOCK} values, got shape {tuple(x.shape)}")
    blocks = x.detach().to(torch.float32).reshape(-1, Q8_0_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = blocks * inv
    a = v.abs()
    whole = a.floor()
    q = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))  # roundf: a half goes away from zero
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return out.numpy().tobytes()


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(value)
    if vtype == BOOL:
        return struct.pack("<B", 1 if value else 0)
    return struct.pack(_SCALAR_FMT[vtype], value)


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]  # ggml order
    ggml_type: int
    nbytes: int
    make: Callable[[], bytes]


class GGUFWriter:
    """Collect metadata and tensors, then `write()` them to `path` (atomically)."""

    def __init__(self, path: str | Path, alignment: int = DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment % 8:
            raise ValueError(f"alignment must be a positive multiple of 8, got {alignment}")
        self.path = Path(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _Tensor] = {}
        if alignment != DEFAULT_ALIGNMENT:
            self.add_uint32("general.alignment", alignment)

    # -- metadata --------------------------------------------------------------------

    def _add(self, key: str, vtype: int, payload: bytes) -> None:
        if key in self._kv:
            raise ValueError(f"GGUF metadata key {key!r} is set twice")
        self._kv[key] = _string(key) + struct.pack("<I", vtype) + payload

    def add_uint32(self, key: str, value: int) -> None:
        self._add(key, UINT32, _value(UINT32, int(value)))

    def add_int32(self, key: str, value: int) -> None:
        self._add(key, INT32, _value(INT32, int(value)))

    def add_uint64(self, key: str, value: int) -> None:
        self._add(key, UINT64, _value(UINT64, int(value)))

    def add_float32(self, key: str, value: float) -> None:
        self._add(key, FLOAT32, _value(FLOAT32, float(value)))

    def add_bool(self, key: str, value: bool) -> None:
        self._add(key, BOOL, _value(BOOL, bool(value)))

    def add_string(self, key: str, value: str) -> None:
        self._add(key, STRING, _value(STRING, str(value)))

    def add_array(self, key: str, values, elem_type: int) -> None:
        """An array of one element type (STRING, a scalar type)."""
        values = list(values)
        body = b"".join(_value(elem_type, v) for v in values)
        self._add(key, ARRAY, struct.pack("<IQ", elem_type, len(values)) + body)

    # -- tensors ---------------------------------------------------------------------

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int, make: Callable[[], bytes]) -> None:
        """A tensor of PyTorch shape `shape` whose bytes `make()` returns when it is written."""
        if name in self._tensors:
            raise ValueError(f"GGUF tensor {name!r} is added twice")
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"unknown ggml type {ggml_type}")
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"{name}: GGUF tensors have 1 to 4 dimensions, got shape {tuple(shape)}")
        block = GGML_TYPES[ggml_type]
        dims = tuple(int(d) for d in reversed(shape))
        if dims[0] % block.block_elems:
            raise ValueError(f"{name}: a {block.name} row must be a multiple of {block.block_elems} values, "
                             f"got {dims[0]} (shape {tuple(shape)})")
        n = 1
        for d in dims:
            n *= d
        self._tensors[name] = _Tensor(name, dims, ggml_type, n // block.block_elems * block.block_bytes, make)

    # -- the file --------------------------------------------------------------------

    def _pad(self, n: int) -> int:
        return -n % self.alignment

    def write(self) -> Path:
        tensors = list(self._tensors.values())
        header = GGUF_MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(self._kv))
        infos, offset = [], 0
        for t in tensors:
            infos.append(_string(t.name) + struct.pack("<I", len(t.dims))
                         + struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.ggml_type, offset))
            offset += t.nbytes + self._pad(t.nbytes)
        head = header + b"".join(self._kv.values()) + b"".join(infos)
        with atomic_write(self.path) as tmp, open(tmp, "wb") as f:
            f.write(head + b"\0" * self._pad(len(head)))
            for t in tensors:
                data = t.make()
                if len(data) != t.nbytes:
                    raise ValueError(f"{t.name}: {len(data)} bytes given, its shape and type need {t.nbytes}")
                f.write(data)
                f.write(b"\0" * self._pad(len(data)))
        return self.path
