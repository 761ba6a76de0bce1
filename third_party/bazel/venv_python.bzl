"""The project's .venv interpreter, as a repository holding one constant.

py_runtime's interpreter_path must be absolute, and the checkout's location belongs to the
machine, not to the source tree, so the path is found when Bazel fetches this repository and
written into the generated `@venv_python//:defs.bzl` (VENV_PYTHON), which the root BUILD.bazel
loads. `JINFER_VENV` (an absolute path, passed with --repo_env) overrides `<workspace>/.venv`."""

def _venv_python_impl(rctx):
    venv = rctx.os.environ.get("JINFER_VENV")
    if not venv:
        venv = str(rctx.path(Label("@//:WORKSPACE")).dirname) + "/.venv"
    python = rctx.path(venv + "/bin/python")
    if not python.exists:
        fail("%s does not exist: `make bazel-test` creates the venv with the test extra" % python)
    rctx.file("BUILD.bazel", "")
    rctx.file("defs.bzl", "VENV_PYTHON = %r\n" % str(python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["JINFER_VENV"],
)
