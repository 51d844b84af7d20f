"""Atomic file writes: a file is either the old one or the complete new one.

Everything minilora writes that a user would hate to lose (adapters, checkpoints,
converted models) goes through `atomic_write`: the bytes go to a temporary file in
the same folder, are flushed to disk, and only then renamed over the target.
`os.replace` is atomic on POSIX and Windows within one file system, so a crash or
a kill mid-write leaves the previous file intact and at worst a stray temporary.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """The mode a plain open() or mkdir() would have given `path` (mkstemp and mkdtemp
    make them private, 0600 and 0700, which would keep a shared run folder unreadable)."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path to write to; on success it replaces `path` atomically.

        with atomic_write(out / "adapter_model.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        give_default_mode(tmp)  # after the writer: some (safetensors) create the file anew
        # Flush the data before the rename, or a power cut could leave the new
        # name pointing at an empty file.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
