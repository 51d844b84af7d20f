"""The test toolchain is the locked one: requirements/dev.lock pins every package the
tests and benchmarks import, and the installed versions must equal it.

An upstream release must not change what our oracles say without a change of ours:
`make test` installs with the lock as pip constraints, and this test fails a .venv that
has drifted from it (a package upgraded by hand, a lock edited without reinstalling).
"""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"
# What the tests and benchmarks import, directly or as the oracles' own machinery.
MUST_BE_LOCKED = {"transformers", "peft", "bitsandbytes", "huggingface-hub", "kernels", "tokenizers", "safetensors",
                  "numpy", "tqdm", "triton", "pytest", "hypothesis", "matplotlib", "accelerate"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep and pinned, f"{LOCK}: {line!r} is not an exact pin (name==version)"
            pins[_normalise(name)] = pinned
    return pins


def test_lock_pins_every_package_the_tests_import():
    missing = MUST_BE_LOCKED - set(locked_versions())
    assert not missing, f"{LOCK} does not pin {sorted(missing)}; run `make lock`"


def test_lock_leaves_torch_to_the_makefile():
    # torch comes from the pinned CPU wheel installed first; a constraint on it could make
    # pip resolve a CUDA build.
    assert "torch" not in locked_versions()


def test_installed_versions_equal_the_lock():
    drift = []
    for name, pinned in sorted(locked_versions().items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            drift.append(f"{name} {installed} (lock: {pinned})")
    assert not drift, ("the test toolchain drifted from requirements/dev.lock: " + "; ".join(drift) +
                       ". Reinstall the locked versions (`make clean test`), or take the new ones on purpose "
                       "with `make lock` and commit the lock")
