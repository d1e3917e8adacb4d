# Both targets work from a fresh clone: they create .venv, install cglab, and run.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo install lint browser bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3  # pinned like everything else: a test must not see the registry drift

# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Style (ruff: format and rules) and the package layering (import-linter), both configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Debian's headless Chromium, for the test that opens the report and its MLflow links as a person would.
browser:
	@.ci/chromium

test: lint browser
	$(BIN)/python -m pytest -q --durations=20 tests

# The unit tier for the inner loop, no lint: what starts Ray, MLflow or worker processes is marked `slow`
# (tests/tier_guard.py fails an unmarked test that does) and `gpu` needs a CUDA device. `make test` runs all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m "not slow and not gpu" tests

demo: $(STAMP)
	$(BIN)/cglab demo

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) .cglab build *.egg-info .ruff_cache .import_linter_cache
