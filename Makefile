# Two commands for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs what it needs; both need only python3 (>= 3.11) and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
XLA_TEST_FLAGS := --xla_force_host_platform_device_count=8

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime dependencies only.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Runtime plus the `test` extra (pytest, hypothesis, torch CPU, transformers).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/python tools/demo.py

test: $(VENV)/.test
	XLA_FLAGS=$(XLA_TEST_FLAGS) $(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.test
	XLA_FLAGS=$(XLA_TEST_FLAGS) $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache
