"""Entry point of the Bazel test targets (tests/defs.bzl): pytest with the target's arguments.

Bazel runs it from the runfiles root, which holds the source tree's layout, so tests/conftest.py
and pyproject.toml's pytest settings apply as under `make test`. Temporary files go under the
target's TEST_TMPDIR and the results to Bazel's XML_OUTPUT_FILE."""

import os
import sys

import pytest

if __name__ == "__main__":
    args = sys.argv[1:]
    if "TEST_TMPDIR" in os.environ:
        args.append("--basetemp=" + os.path.join(os.environ["TEST_TMPDIR"], "pytest"))
    if "XML_OUTPUT_FILE" in os.environ:
        args.append("--junitxml=" + os.environ["XML_OUTPUT_FILE"])
    sys.exit(pytest.main(args))
