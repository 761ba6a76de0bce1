"""DESIGN's dependency direction, checked on every import statement (function-level ones too):
tools -> scheduler -> jinfer -> {sharding, pallas_kernels}."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tools", "scheduler", "jinfer", "sharding", "pallas_kernels")
# What each package may import among the project's packages.
ALLOWED = {
    "pallas_kernels": {"pallas_kernels"},
    "sharding": {"sharding"},
    "jinfer": {"jinfer", "sharding", "pallas_kernels"},
    "scheduler": {"scheduler", "jinfer", "sharding", "pallas_kernels"},
    "tools": set(PACKAGES) | {"configs"},
}


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def _violations(package):
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for module, line in _imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[package]:
                    found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package):
    assert not _violations(package), "\n".join(_violations(package))


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    bad = tmp_path / "sharding"
    bad.mkdir()
    (bad / "x.py").write_text("def f():\n    from jinfer.engine import Engine\n")
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    assert _violations("sharding") == ["sharding/x.py:2 imports jinfer.engine"]
