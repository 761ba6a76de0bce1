"""One Bazel py_test per tests/test_*.py file, each running pytest on that file as `make test`
does (`-m "not slow"`, 8 fake CPU devices). The targets come from a glob, so a new test file
needs no BUILD edit; only a file too slow for the default timeout needs an entry in SLOW."""

XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"  # as the Makefile

# Files whose default run took over 100 s alone on 2 busy CPU cores (test_speculation about
# 8 minutes): the "eternal" timeout (3600 s), since targets run side by side and share the
# cores. Every other file has its "large" size's 900 s.
SLOW = [
    "test_engine.py",
    "test_model_parity.py",
    "test_pallas_backend.py",
    "test_pallas_kernels.py",
    "test_rl.py",
    "test_serving_hostile.py",
    "test_speculation.py",
]

def pytest_suite(slow = SLOW):
    """A py_test named after each tests/test_*.py file (`test_engine` for test_engine.py)."""
    files = native.glob(["test_*.py"])
    for name in slow:
        if name not in files:
            fail("SLOW names %s, which is not a tests/test_*.py file" % name)
    for src in files:
        native.py_test(
            name = src[:-len(".py")],
            srcs = ["pytest_main.py", src],
            main = "pytest_main.py",
            args = ["-q", "-p", "no:cacheprovider", "-m", "'not slow'", "tests/" + src],
            env = {"XLA_FLAGS": XLA_FLAGS},
            deps = [":tests"],
            data = ["//:sources"],
            legacy_create_init = False,
            python_version = "PY3",
            size = "large",
            timeout = "eternal" if src in slow else None,
        )
