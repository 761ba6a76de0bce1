# Two commands for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs what it needs; both need only python3 (>= 3.11) and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# 8 fake CPU devices for the sharding tests; LLVM's optimisation passes off (XLA's own HLO
# passes still run): compiling is most of the suite's time (docs/testing.md).
XLA_TEST_FLAGS := --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0
# `make test` runs in this many pytest processes (pytest-xdist), each taking whole test files
# (--dist loadfile keeps a file's shared engines and module fixtures in one process).
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow notebooks bazel-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime dependencies only.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Runtime plus the `test` extra (pytest, pytest-xdist, hypothesis, torch CPU, transformers).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/python tools/demo.py

test: $(VENV)/.test
	XLA_FLAGS="$(XLA_TEST_FLAGS)" $(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

test-slow: $(VENV)/.test
	XLA_FLAGS="$(XLA_TEST_FLAGS)" $(BIN)/python -m pytest -q -m slow

# Re-executes notebooks/ at full size and saves their outputs (docs/notebooks.md).
notebooks: $(VENV)/.test
	$(BIN)/python tools/run_notebooks.py --size=full

# The default set through Bazel 4, one target per test file (docs/testing.md#bazel):
# `make bazel-test TARGETS=//tests:test_launch` runs some. Without `bazel` on PATH it installs
# Debian's bazel-bootstrap and rules_java with apt-get, which needs root (or sudo).
TARGETS ?= //...
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)

bazel-test: $(VENV)/.test
	command -v bazel >/dev/null && [ -d /usr/share/bazel/rules/java ] || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q bazel-bootstrap bazel-rules-java; }
	bazel test $(if $(filter-out .venv,$(VENV)),--repo_env=JINFER_VENV=$(abspath $(VENV))) $(TARGETS)

clean:
	rm -rf $(VENV) .pytest_cache
