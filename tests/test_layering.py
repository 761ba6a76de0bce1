"""DESIGN's dependency direction, checked on every edge between the project's packages: import
statements (function-level ones too) and strings that name a module (`pkg.module` or
`pkg.module:Name`, what importlib, `python -m` and config values load):
tools -> harness -> entrypoints -> scheduler -> jinfer -> {sharding, pallas_kernels};
configs -> jinfer."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tools", "harness", "entrypoints", "configs", "scheduler", "jinfer", "sharding", "pallas_kernels")
# What each package may reference among the project's packages.
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "sharding": {"sharding"},
    "jinfer": {"jinfer", "sharding", "pallas_kernels"},
    "scheduler": {"scheduler", "jinfer", "sharding", "pallas_kernels"},
    "configs": {"configs", "jinfer"},
    "entrypoints": {"entrypoints", "configs", "scheduler", "jinfer", "sharding", "pallas_kernels"},
    "harness": {"harness", "entrypoints", "configs", "scheduler", "jinfer", "sharding", "pallas_kernels"},
    "tools": set(PACKAGES),
}
# A string that is a module reference and nothing else: jinfer.engine, scheduler.slo.policies:SloAware.
MODULE_STRING = re.compile(r"(?:%s)(?:\.\w+)+(?::\w+)?" % "|".join(PACKAGES))


def _references(path):
    """(module, line, how) for every import and every string naming a module in the file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno, "imports") for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno, "imports"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            yield node.value.partition(":")[0], node.lineno, "names"


def _violations(package):
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for module, line, how in _references(path):
                top = module.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[package]:
                    found.append(f"{os.path.relpath(path, ROOT)}:{line} {how} {module}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_references_point_down(package):
    assert not _violations(package), "\n".join(_violations(package))


def test_the_checker_sees_a_wrong_import_and_a_module_named_in_a_string(tmp_path, monkeypatch):
    bad = tmp_path / "jinfer"
    bad.mkdir()
    (bad / "x.py").write_text("import importlib\n\n"
                              "def f():\n    from entrypoints.build import build_engine\n\n"
                              "POLICY = 'scheduler.slo.policies:SloAware'\n"
                              "g = importlib.import_module('entrypoints.serve')\n"
                              "OK = ('jinfer.engine', 'scheduler is a word', 'see scheduler.slo.policies for more')\n")
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    assert _violations("jinfer") == ["jinfer/x.py:4 imports entrypoints.build", "jinfer/x.py:6 names scheduler.slo.policies",
                                     "jinfer/x.py:7 names entrypoints.serve"]
