"""The `minilora` command line (`commands.py`), the demo (`demo.py`), and `minilora info` (`info.py`)."""

from .commands import main

__all__ = ["main"]
