"""The research notebooks (notebooks/): each runs top to bottom at the small size in a fresh
python3 kernel and shows what it should; the committed .ipynb files hold the same cells as
their percent scripts, with the outputs of a full-size run."""

import concurrent.futures
import os

import pytest

from harness.experiments import notebooks


def _outputs(nb) -> tuple[str, int]:
    """Every text and markdown output of a notebook joined, and how many PNG images it shows."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.ename}: {out.evalue}"
            if out.output_type == "stream":
                text.append(out.text)
            elif "data" in out:
                images += "image/png" in out.data
                text.append(out.data.get("text/markdown", out.data.get("text/plain", "")))
    return "\n".join(text), images


def _script(name):
    return os.path.join(notebooks.NOTEBOOKS_DIR, f"{name}.py")


# What each notebook must show at any size, beyond running without a cell error.
EXPECTED = {
    "sharding_strategies": ("Bytes crossing devices per decode step", "| all-reduce | all-gather | reduce-scatter",
                            "Head at tp 8: replicated"),
    "instances_and_resharding": ("outputs unchanged: all", "- Outputs: every request of the regrouped run"),
    "prefix_routing": ("| round-robin | least-load | sglang | preble-e2 |", "| toolbench |", "| embodied |",
                       "| programming |", "| videoqa |", "| loogle |"),
}


# And what each shows at one size only (the sizes regroup over different partitions).
BY_SIZE = {
    ("instances_and_resharding", "small"): ("| 4+4 → 8 | weights |",),
    ("instances_and_resharding", "full"): ("| 4+4 → 2+2+2+2 | weights |", "| 4+2+1+1 → 4+4 | kv |"),
}


# Notebooks that shard over several devices (the 8 fake CPU devices their kernels inherit).
MULTI_DEVICE = ("sharding_strategies", "instances_and_resharding")


@pytest.fixture(scope="module")
def small_runs(request):
    """Every selected notebook run at the small size, two kernels at a time (each compiles on
    one core for most of its run): name -> the executed notebook, or the exception its run
    raised. A notebook whose test was deselected (-m, -k) is not run."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.originalname == "test_notebook_runs_at_small_size"}
    names = [name for name in notebooks.NAMES if name in selected]

    def run(name):
        try:
            return notebooks.execute(notebooks.read(_script(name)), "small", timeout=600)
        except Exception as e:  # noqa: BLE001 - handed to that notebook's test
            return e
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(run, names)))


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.multi_device) if name in MULTI_DEVICE
                                  else name for name in notebooks.NAMES])
def test_notebook_runs_at_small_size(name, small_runs):
    nb = small_runs[name]
    if isinstance(nb, Exception):
        raise nb
    text, images = _outputs(nb)
    assert "size small" in text
    for expected in EXPECTED[name] + BY_SIZE.get((name, "small"), ()):
        assert expected in text, f"{name} does not show {expected!r}"
    assert images >= 2


@pytest.mark.parametrize("name", notebooks.NAMES)
def test_committed_notebook_is_its_script_run_at_full_size(name):
    committed = notebooks.read(os.path.join(notebooks.NOTEBOOKS_DIR, f"{name}.ipynb"))
    assert notebooks.sources(committed) == notebooks.sources(notebooks.read(_script(name))), (
        f"notebooks/{name}.ipynb and .py differ: run tools/run_notebooks.py --notebooks={name}")
    assert all(c.execution_count for c in committed.cells if c.cell_type == "code"), "a cell was not run"
    text, images = _outputs(committed)  # (no cell's output is an error)
    assert "size full" in text and images >= 2
    for expected in EXPECTED[name] + BY_SIZE.get((name, "full"), ()):  # what the notebook is for
        assert expected in text, f"notebooks/{name}.ipynb does not show {expected!r}: rerun it"


def test_execute_refuses_an_unknown_size():
    with pytest.raises(ValueError, match=r"size='medium' must be one of \('small', 'full'\)"):
        notebooks.execute(notebooks.read(_script("prefix_routing")), "medium")
