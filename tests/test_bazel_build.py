"""The Bazel targets (tests/defs.bzl) cover every test file and run it as `make test` does.

The macro is evaluated here with a stand-in for Bazel's `native` module (the .bzl file's
Starlark is also Python), so the check needs no Bazel."""

import fnmatch
import os
import re
import shlex
import types

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class _BazelFail(Exception):
    pass


def _targets(files, **kwargs):
    """The py_test calls pytest_suite makes when tests/ holds `files`: name -> attributes."""
    made = {}

    def py_test(name, **attrs):
        assert name not in made, f"two targets named {name}"
        made[name] = attrs

    def glob(include, exclude=()):
        def match(f, patterns):
            return any(fnmatch.fnmatch(f, p) for p in patterns)
        return sorted(f for f in files if match(f, include) and not match(f, exclude))

    def fail(msg):
        raise _BazelFail(msg)

    scope = {"native": types.SimpleNamespace(glob=glob, py_test=py_test), "fail": fail}
    path = os.path.join(TESTS, "defs.bzl")
    exec(compile(open(path).read(), path, "exec"), scope)
    scope["pytest_suite"](**kwargs)
    return made


def _make_test_command():
    """`make test`'s XLA_FLAGS and pytest arguments, read from the Makefile."""
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    flags = re.search(r"^XLA_TEST_FLAGS := (.+)$", makefile, re.M).group(1)
    recipe = re.search(r"^test: .*\n\t(.+)$", makefile, re.M).group(1)
    return flags, shlex.split(recipe.split("-m pytest", 1)[1])


def _marker(args):
    """The `-m` expression in pytest arguments."""
    return args[args.index("-m") + 1]


def test_every_test_file_is_one_target_running_it_as_make_test_does():
    files = os.listdir(TESTS)
    tests = sorted(f for f in files if f.startswith("test_") and f.endswith(".py"))
    targets = _targets(files)
    assert sorted(targets) == [f[:-3] for f in tests]
    xla_flags, pytest_args = _make_test_command()
    for name, attrs in targets.items():
        args = [a for arg in attrs["args"] for a in shlex.split(arg)]  # Bazel tokenizes args like sh
        assert args[-1] == f"tests/{name}.py" and f"{name}.py" in attrs["srcs"]
        assert _marker(args) == _marker(pytest_args), name
        assert attrs["env"]["XLA_FLAGS"] == xla_flags


def test_a_slow_entry_naming_no_test_file_is_refused():
    with pytest.raises(_BazelFail, match="test_gone.py"):
        _targets(["test_a.py"], slow=["test_gone.py"])


@pytest.mark.slow  # installs Bazel with apt-get where it is missing (root or sudo), then a cold Bazel start
def test_make_bazel_test_runs_a_target_with_the_tests_make_test_runs():
    """`make bazel-test` on one target: Bazel builds the runfiles tree, runs the file's tests
    through tests/pytest_main.py and passes; its log holds as many passed tests as pytest
    collects from that file with `make test`'s marker."""
    import subprocess
    import sys

    target, src = "//tests:test_workloads", "tests/test_workloads.py"
    make = subprocess.run(["make", "bazel-test", f"TARGETS={target}", f"VENV={sys.prefix}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    out = make.stdout + make.stderr
    assert make.returncode == 0, out[-4000:]
    assert re.search(rf"^{re.escape(target)}\s+(PASSED|\(cached\) PASSED)", out, re.M), out[-4000:]
    log = open(os.path.join(ROOT, "bazel-testlogs", "tests", "test_workloads", "test.log")).read()
    _, pytest_args = _make_test_command()
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-m", _marker(pytest_args), src], cwd=ROOT, capture_output=True, text=True)
    collected = re.search(r"^(\d+)(?:/\d+)? tests? (?:collected|selected)", collect.stdout, re.M)
    assert collected, collect.stdout[-2000:]
    assert re.search(rf"^{collected.group(1)} passed in ", log, re.M) and " failed" not in log, log[-2000:]
