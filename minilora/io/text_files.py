"""Text files whose bytes are not UTF-8 are named, not left to the codec's bare message.

`UnicodeDecodeError` says which byte could not be decoded but not in which file; a run
reads a config, data files and adapter configs, so the user could not tell which one
to fix.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def utf8_errors_named(path: str | os.PathLike, error: type[Exception] = ValueError):
    """Inside the block, a UnicodeDecodeError becomes `error` naming `path` and the byte."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
