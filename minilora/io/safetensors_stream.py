"""Write a .safetensors file one tensor at a time: what `quantize_folder` streams into."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .atomic import atomic_write

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class SafetensorsStream:
    """Write a .safetensors file one tensor at a time, holding none of them in memory.

    The format is an 8-byte little-endian header length, a JSON header with every
    tensor's dtype, shape and byte range, then the bytes. The header comes first but
    is known only at the end, so the bytes go to temporary files first, one per
    element size (8, 4, 2, 1 bytes); concatenated in that order every tensor starts
    at a multiple of its own element size, as safetensors' own writer guarantees, so
    readers can map it without copying.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, tuple[str, list[int], int, int, int]] = {}
        self._bodies: dict[int, tuple] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.entries:
            raise ValueError(f"tensor {key!r} written twice")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"safetensors cannot store {key!r} of dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        size = t.element_size()
        if size not in self._bodies:
            self._bodies[size] = [tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}."), 0]
        body = self._bodies[size]
        nbytes = t.numel() * size
        if nbytes:
            body[0].write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.entries[key] = (_ST_DTYPES[t.dtype], list(t.shape), size, body[1], nbytes)
        body[1] += nbytes

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        sizes = sorted(self._bodies, reverse=True)
        starts, pos = {}, 0
        for size in sizes:
            starts[size], pos = pos, pos + self._bodies[size][1]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        for key, (dtype, shape, size, offset, nbytes) in self.entries.items():
            begin = starts[size] + offset
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # data starts 8-aligned; safetensors pads with spaces too
        with atomic_write(self.path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for size in sizes:
                body = self._bodies[size][0]
                body.seek(0)
                shutil.copyfileobj(body, out, 16 << 20)
        self.close()
        return self.path

    def close(self) -> None:
        for body, _ in self._bodies.values():
            body.close()  # TemporaryFile: deleted on close
        self._bodies = {}
