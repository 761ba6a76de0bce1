"""tools/bench_spec.py's method names: the suffixes it takes (@sync, @closed, @f<factor>) and the
drafter a factor gives, checked in subprocesses (the tool defines absl flags at import)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_spec.py")


def test_a_bad_method_is_refused_by_name_before_anything_is_built():
    for bad in ("ngram@f4", "suffix@fx", "suffix@f-1", "suffix@finf", "off@closed", "bogus", "suffix@f4@sync",
                "suffix_fixed@f2", "never@closed"):
        res = subprocess.run([sys.executable, TOOL, f"--methods=off,{bad}"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert res.returncode != 0
        assert f"--methods: {bad!r}" in res.stderr, res.stderr[-2000:]
        assert "compiled" not in res.stderr  # refused before any engine warmed up
    res = subprocess.run([sys.executable, TOOL, "--methods=suffix,ngram"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "off is missing" in res.stderr, res.stderr[-2000:]


def test_a_factor_suffix_sets_the_suffix_drafters_cap_and_nothing_else():
    code = """
import sys
sys.path.insert(0, ".")
from tools import bench_spec as bs
from jinfer.config import SpeculationConfig
bs.FLAGS(["bench_spec"])
chain, budget = bs._drafter("suffix@f4")
tree, _ = bs._drafter("suffix_tree@f2.5")
plain, _ = bs._drafter("suffix_tree")
assert (chain.config.max_spec_factor, chain.config.tree) == (4.0, False), chain.config
assert (tree.config.max_spec_factor, tree.config.tree) == (2.5, True), tree.config
assert plain.config.max_spec_factor == SpeculationConfig().suffix_max_spec_factor, plain.config
assert budget is not None and budget.config.max_lead is None
assert all(bs._valid_option(*m.partition("@")[::2]) for m in ("suffix@f0", "suffix_tree@f4", "ngram@closed",
                                                                "off@sync", "suffix_fixed"))
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
