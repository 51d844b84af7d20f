"""The package as users install it: six runtime dependencies (and jinja2, which torch
installs, for chat templates), kernels/ as minilora.kernels."""

import ast
import importlib
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"torch", "safetensors", "tokenizers", "numpy", "tqdm", "triton", "jinja2"}
PEERS = {"transformers", "peft", "bitsandbytes", "accelerate", "datasets", "yaml", "matplotlib"}


def test_runtime_dependencies_are_exactly_the_core_six_and_jinja2():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(";")[0].strip().split("=")[0].split(">")[0].split("<")[0] for dep in project["dependencies"]}
    assert names == RUNTIME
    triton = next(d for d in project["dependencies"] if d.startswith("triton"))
    assert "sys_platform == 'linux'" in triton
    # jinja2 is one of torch's own requirements, so declaring it adds nothing to install.
    import importlib.metadata as md

    assert any(r.lower().startswith("jinja2") for r in md.requires("torch"))
    assert {"transformers", "peft", "bitsandbytes"} <= set(project["optional-dependencies"]["dev"])
    assert project["scripts"]["minilora"] == "minilora.cli:main"


def _optional_import_nodes(tree) -> set[int]:
    """Import statements guarded by `try: ... except ImportError`."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


def test_library_code_imports_no_peer_library():
    """Peers never; matplotlib only as an optional import (the loss plot)."""
    offenders = []
    for path in [*ROOT.joinpath("minilora").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        optional = _optional_import_nodes(tree)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top in PEERS and not (top == "matplotlib" and id(node) in optional):
                    offenders.append(f"{path.relative_to(ROOT)}: {n}")
    assert not offenders


def test_editable_install_maps_kernels_to_minilora_kernels():
    kernels = importlib.import_module("minilora.kernels")
    assert Path(kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_wheel_ships_kernels_inside_minilora_and_no_top_level_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("minilora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {f"minilora/{p.relative_to(ROOT / 'minilora')}" for p in (ROOT / "minilora").rglob("*.py")}
    sources |= {f"minilora/kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels").rglob("*.py")}
    assert sources - set(names) == set(), "source files missing from the wheel"
    assert not any(n.startswith("kernels/") for n in names)
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"minilora"}
