"""The `minilora` command line (`main.py`), the demo, and `minilora info`."""

from .commands import main

__all__ = ["main"]
