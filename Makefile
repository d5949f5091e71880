# voxcore developer commands. `make demo` and `make test` work on a fresh machine: they create the
# virtualenv and install what they need (Python >= 3.11 and redis-server on PATH; .ci/run installs it).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.voxcore-installed
# A strict editable install (a link tree) lets mypy and import-linter see the `voxcore` package
# mapped onto src/; it must be refreshed when files are added, hence the dependency on every file.
SOURCES := pyproject.toml $(shell find src -type f -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: install demo test test-py313 lint typecheck unit integration bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet -e ".[test,otel,web]" --config-settings editable_mode=strict
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/voxcore demo

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests bench scripts

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
	$(VENV313)/bin/python -m pip install --quiet -e ".[test,otel,web]" --config-settings editable_mode=strict
	@touch $@

test-py313: $(VENV313)/.voxcore-installed
	$(VENV313)/bin/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

bench: install
	$(BIN)/python bench/bench_cache.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_rate_limit.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_llm.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) $(VENV313) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
