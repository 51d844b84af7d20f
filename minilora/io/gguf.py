"""A GGUF v2/v3 reader and the dequantizers for the block formats minilora imports.

GGUF is llama.cpp's single-file model format. Everything is little-endian, and the file
is laid out in four parts::

    +--------------------------------------------------------------------+
    | header   "GGUF" magic (4 B) | version u32 | tensor_count u64       |
    |          | metadata_kv_count u64                                  |
    +--------------------------------------------------------------------+
    | metadata kv_count x { key: string | value_type u32 | value }       |
    |          string = u64 byte length + UTF-8 bytes (no terminator)    |
    |          array  = elem_type u32 | count u64 | count values         |
    +--------------------------------------------------------------------+
    | tensor   tensor_count x { name: string | n_dims u32 |             |
    | infos             ne[0..n_dims) u64 | ggml_type u32 | offset u64 } |
    +--------------------------------------------------------------------+
    | padding  zero bytes up to a multiple of `general.alignment` (32)   |
    +--------------------------------------------------------------------+
    | data     tensor bytes; each tensor starts at data_start + offset,  |
    |          offsets are multiples of the alignment                    |
    +--------------------------------------------------------------------+

`ne[0]` is the fastest-moving dimension (ggml's convention), so a weight listed as
(ne0, ne1) = (in, out) is the row-major numpy array of shape (out, in): we reverse
the dims to get the PyTorch shape.

Quantized tensors are sequences of fixed-size blocks of 32 values along ne0::

    Q8_0  (34 B)  d: fp16 | q[32]: int8                 x_i = d * q_i
    Q4_0  (18 B)  d: fp16 | qs[16]: packed nibbles      x_i = d * (q_i - 8)
    Q4_1  (20 B)  d: fp16 | m: fp16 | qs[16]: nibbles   x_i = d * q_i + m

In both 4-bit formats byte j of `qs` carries element j in its low nibble and
element j + 16 in its high nibble, so a block unpacks as [low nibbles, high nibbles].

The reader memory-maps the file and checks every length, count and offset against
the file size before using it: a damaged or hostile file raises `GGUFError` naming
the problem instead of crashing, hanging, or allocating gigabytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class GGUFError(ValueError):
    """The file is not a GGUF file minilora can read; the message says why."""


class GGMLType(NamedTuple):
    name: str
    block_elems: int  # values per block (1 for plain float/int types)
    block_bytes: int  # bytes per block


# Every ggml type id we know the block size of, so that sizes and offsets of any
# tensor can be validated even when we cannot dequantize its type.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4), 1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18), 3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22), 7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34), 9: GGMLType("Q8_1", 32, 36),
    10: GGMLType("Q2_K", 256, 84), 11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144), 13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210), 15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66), 17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98), 19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18), 21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82), 23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1), 25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4), 27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8), 29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
}
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
BF16 = 30
SUPPORTED_TYPES = (F32, F16, Q4_0, Q4_1, Q8_0)

# Metadata value types. Fixed-size ones map to a struct format; 8 and 9 are variable.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
STRING, ARRAY, UINT64, INT64, FLOAT64 = range(8, 13)
_SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I",
               INT32: "<i", FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY_DTYPE = {k: np.dtype(v) for k, v in _SCALAR_FMT.items()}

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; nothing current writes it
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # arrays of arrays are legal, but deep nesting is only a recursion bomb
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: ne0 (fastest) first
    ggml_type: int
    offset: int  # absolute file offset of the first byte (data_start already added)
    n_elements: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch/numpy shape: the ggml dims reversed, e.g. (out, in) for a weight."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name


def _type_list(ids) -> str:
    return ", ".join(f"{GGML_TYPES[i].name} ({i})" for i in ids)


class GGUFReader:
    """Parse a GGUF file's header, metadata and tensor table; read tensors lazily.

    `source` is a path, or bytes (handy for tests and fuzzing). Attributes:
    `version`, `metadata` (key -> Python value; arrays become lists), `metadata_types`
    (key -> value type id, arrays as (ARRAY, elem_type)), `tensors` (name -> TensorInfo,
    in file order), `alignment`, `data_start`.
    """

    def __init__(self, source: str | os.PathLike | bytes | bytearray | memoryview):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path = None
            self._buf = np.frombuffer(bytes(source), dtype=np.uint8)
        else:
            self.path = os.fspath(source)
            size = os.path.getsize(self.path)  # FileNotFoundError names the path
            if size == 0:  # np.memmap refuses empty files with an unhelpful message
                raise GGUFError(f"{self.path}: file is empty, not a GGUF file")
            # A memory map lets us slice tensors out without reading the whole file.
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.size = int(self._buf.shape[0])
        self._where = self.path or "<bytes>"
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- low-level cursor reads; each checks the remaining size first -------------

    def _fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self._where}: {msg}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"truncated file: {what} needs {n} bytes at offset {self._pos}, "
                             f"but the file has {self.size} bytes")

    def _scalar(self, vtype: int, what: str):
        fmt = _SCALAR_FMT[vtype]
        n = struct.calcsize(fmt)
        self._need(n, what)
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return bool(v) if vtype == BOOL else v

    def _string(self, what: str) -> str:
        n = self._scalar(UINT64, f"length of {what}")
        self._need(n, f"{what} ({n} bytes)")  # rejects absurd lengths before any allocation
        raw = self._buf[self._pos:self._pos + n].tobytes()
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def _value(self, vtype: int, what: str, depth: int = 0):
        if vtype == STRING:
            return self._string(what), STRING
        if vtype == ARRAY:
            return self._array(what, depth)
        if vtype in _SCALAR_FMT:
            return self._scalar(vtype, what), vtype
        raise self._fail(f"{what} has unknown metadata value type {vtype} (known: 0..12)")

    def _array(self, what: str, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            raise self._fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        etype = self._scalar(UINT32, f"element type of {what}")
        if etype not in _SCALAR_FMT and etype not in (STRING, ARRAY):
            raise self._fail(f"{what} has unknown array element type {etype} (known: 0..12)")
        count = self._scalar(UINT64, f"length of {what}")
        # Smallest possible encoding per element: a count the file cannot hold is corrupt,
        # and checking it now bounds every loop and allocation below by the file size.
        min_elem = {STRING: 8, ARRAY: 12}.get(etype) or _NUMPY_DTYPE[etype].itemsize
        if count * min_elem > self.size - self._pos:
            raise self._fail(f"{what}: array length {count} does not fit in the "
                             f"{self.size - self._pos} bytes left in the file")
        if etype in _NUMPY_DTYPE:  # fixed-size elements: one vectorised read
            dt = _NUMPY_DTYPE[etype]
            n = count * dt.itemsize
            vals = self._buf[self._pos:self._pos + n].view(dt)
            self._pos += n
            out = vals.astype(bool).tolist() if etype == BOOL else vals.tolist()
            return out, (ARRAY, etype)
        items, etypes = [], None
        for i in range(count):
            v, t = self._value(etype, f"{what}[{i}]", depth + 1)
            items.append(v)
            etypes = t
        return items, (ARRAY, etypes if etype == ARRAY else etype)

    # -- the file structure ------------------------------------------------------

    def _parse(self) -> None:
        self._need(4, "magic")
        magic = self._buf[:4].tobytes()
        if magic != GGUF_MAGIC:
            raise self._fail(f"bad magic {magic!r}: not a GGUF file (expected b'GGUF')")
        self._pos = 4
        self.version = self._scalar(UINT32, "version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = ""
            if int.from_bytes(self.version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                hint = " (this looks like a big-endian GGUF; convert it to little-endian)"
            raise self._fail(f"unsupported GGUF version {self.version}{hint}; "
                             f"supported versions: {SUPPORTED_VERSIONS}")
        n_tensors = self._scalar(UINT64, "tensor_count")
        n_kv = self._scalar(UINT64, "metadata_kv_count")
        # A KV entry takes at least 13 bytes and a tensor info at least 24.
        if n_kv * 13 > self.size or n_tensors * 24 > self.size:
            raise self._fail(f"absurd counts: {n_tensors} tensors and {n_kv} metadata "
                             f"entries cannot fit in a {self.size}-byte file")
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.metadata:
                raise self._fail(f"duplicate metadata key {key!r}")
            vtype = self._scalar(UINT32, f"value type of {key!r}")
            self.metadata[key], self.metadata_types[key] = self._value(vtype, f"metadata {key!r}")

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (self.metadata_types.get("general.alignment", UINT32) != UINT32
                or self.alignment <= 0 or self.alignment & (self.alignment - 1)):
            raise self._fail(f"general.alignment must be a power-of-two uint32, "
                             f"got {self.alignment!r}")

        raw_infos = []
        for i in range(n_tensors):
            name = self._string(f"name of tensor #{i}")
            n_dims = self._scalar(UINT32, f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name!r} has {n_dims} dims; GGUF allows 1..{MAX_DIMS}")
            dims = tuple(self._scalar(UINT64, f"dim {d} of tensor {name!r}") for d in range(n_dims))
            gtype = self._scalar(UINT32, f"type of tensor {name!r}")
            offset = self._scalar(UINT64, f"offset of tensor {name!r}")
            raw_infos.append((name, dims, gtype, offset))

        # The data section begins at the first aligned offset after the tensor table.
        self.data_start = -(-self._pos // self.alignment) * self.alignment
        for name, dims, gtype, offset in raw_infos:
            self._add_tensor(name, dims, gtype, offset)
        # Two tensors sharing bytes would each read the other's values: refuse overlaps.
        spans = sorted((info.offset, info.offset + info.nbytes, name) for name, info in self.tensors.items())
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise self._fail(f"tensors {first!r} and {second!r} overlap (bytes {start} to {end})")

    def _add_tensor(self, name: str, dims: tuple[int, ...], gtype: int, offset: int) -> None:
        if name in self.tensors:
            raise self._fail(f"duplicate tensor name {name!r}")
        if gtype not in GGML_TYPES:
            raise self._fail(f"tensor {name!r} has unknown ggml type {gtype}; "
                             f"known types: {_type_list(GGML_TYPES)}")
        t = GGML_TYPES[gtype]
        if dims[0] % t.block_elems:
            raise self._fail(f"tensor {name!r}: ne0={dims[0]} is not a multiple of the "
                             f"{t.name} block size {t.block_elems}")
        n_elements = 1
        for d in dims:  # Python ints cannot overflow; stop as soon as it cannot fit
            n_elements *= d
            if n_elements // t.block_elems * t.block_bytes > self.size:
                raise self._fail(f"tensor {name!r} with dims {dims} ({t.name}) is larger "
                                 f"than the whole {self.size}-byte file")
        nbytes = n_elements // t.block_elems * t.block_bytes
        if offset % self.alignment:
            raise self._fail(f"tensor {name!r} offset {offset} is not a multiple of the "
                             f"alignment {self.alignment}")
        start = self.data_start + offset
        if start + nbytes > self.size:
            raise self._fail(f"tensor {name!r} (offset {offset}, {nbytes} bytes) runs past "
                             f"the end of the file ({self.size} bytes, data starts at "
                             f"{self.data_start})")
        self.tensors[name] = TensorInfo(name, dims, gtype, start, n_elements, nbytes)

    # -- tensor access -----------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view into the memory map (no copy)."""
        info = self._info(name)
        return self._buf[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 copy of a tensor, in PyTorch shape (dims reversed)."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type, info.n_elements).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        if self._buf is None:
            raise ValueError(f"{self._where}: the reader is closed; open a new GGUFReader")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self._where} has no tensor {name!r}") from None

    def close(self) -> None:
        mm = getattr(self._buf, "_mmap", None)
        self._buf = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a raw() view; it keeps the map alive
                pass

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- dequantization -------------------------------------------------------------
# Each function takes the raw uint8 bytes of whole blocks and returns float32 values
# in file order. They are vectorised over blocks: one numpy expression per field.


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.size % block_bytes:
        raise GGUFError(f"{raw.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return raw.reshape(-1, block_bytes)


def _fp16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    # The per-block scale sits at a byte offset; copying 2 bytes per block into a
    # contiguous array lets us reinterpret them as fp16 with no alignment trouble.
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # Low nibbles are elements 0..15, high nibbles 16..31, hence concatenate (not interleave).
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)
    d = _fp16_field(b, 0)
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)
    d = _fp16_field(b, 0)
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8.0
    return (q * d).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)
    d, m = _fp16_field(b, 0), _fp16_field(b, 2)
    q = _nibbles(b[:, 4:]).astype(np.float32)
    return (q * d + m).reshape(-1)


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int | None = None) -> np.ndarray:
    """Raw tensor bytes of `ggml_type` -> a new flat float32 array."""
    if ggml_type not in SUPPORTED_TYPES:
        name = GGML_TYPES[ggml_type].name if ggml_type in GGML_TYPES else "unknown"
        raise GGUFError(f"cannot dequantize ggml type {name} ({ggml_type}); supported types: "
                        f"{_type_list(SUPPORTED_TYPES)}. Re-quantize the model with one of "
                        f"these (e.g. llama.cpp's llama-quantize ... Q8_0).")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    _blocks(raw, GGML_TYPES[ggml_type].block_bytes)  # whole blocks only, or a clear error
    # An inf/NaN scale in a damaged file yields NaN values, as llama.cpp would: no warning.
    with np.errstate(invalid="ignore", over="ignore"):
        if ggml_type == F32:
            out = raw.view(np.float32).copy()  # copy: detach from the (read-only) memory map
        elif ggml_type == F16:
            out = raw.view(np.float16).astype(np.float32)
        elif ggml_type == Q8_0:
            out = dequantize_q8_0(raw)
        elif ggml_type == Q4_0:
            out = dequantize_q4_0(raw)
        else:
            out = dequantize_q4_1(raw)
    if n_elements is not None and out.size != n_elements:
        raise GGUFError(f"expected {n_elements} values, the bytes hold {out.size}")
    return out
