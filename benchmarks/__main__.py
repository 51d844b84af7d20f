"""`python -m benchmarks [SUITE ...] [--quick]`: the runner in benchmarks/runner.py.

`python -m` puts the current folder first on sys.path. From the repository root that
makes the repo's kernels/ importable as a top-level package `kernels`, and bitsandbytes
(imported by peft, transformers and our suites) would take it for the PyPI package of
that name. The package `benchmarks` is already imported when this file runs, so the
entry can go now, before anything imports bitsandbytes; minilora itself is installed
(editable) in the virtualenv and does not need it.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

from benchmarks.runner import main  # noqa: E402

sys.exit(main())
