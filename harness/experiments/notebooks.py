"""Runs the research notebooks top to bottom in a fresh python3 kernel (nbclient), at a study
size. A notebook's source is its jupytext percent script (notebooks/NAME.py); its .ipynb pair
holds the same cells with the outputs of the last full run. Needs the `test` extra."""

from __future__ import annotations

import os

import jupytext
import nbformat
from nbclient import NotebookClient

from harness.experiments import _DEVICE_FLAG, SIZE_VARIABLE, SIZES

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "notebooks")
NAMES = ("sharding_strategies", "instances_and_resharding", "prefix_routing")


def read(path: str) -> nbformat.NotebookNode:
    """A notebook from a percent script (.py) or an .ipynb, paired with both formats."""
    nb = jupytext.read(path)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def sources(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """(cell type, source) of every cell: what a script and its .ipynb must agree on."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def execute(nb: nbformat.NotebookNode, size: str, *, timeout: int = 900, cwd: str = NOTEBOOKS_DIR,
            devices: int = 8) -> nbformat.NotebookNode:
    """Runs every cell of `nb` in place in a new python3 kernel whose environment sets the study
    size and `devices` fake CPU devices; raises nbclient.exceptions.CellExecutionError naming
    the first cell that fails. timeout: seconds per cell."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {SIZES}")
    env = dict(os.environ)
    env[SIZE_VARIABLE] = size
    if _DEVICE_FLAG not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_DEVICE_FLAG}={devices}".strip()
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}})
    client.execute(env=env)
    return nb


def write(nb: nbformat.NotebookNode, name: str, directory: str = NOTEBOOKS_DIR) -> tuple[str, str]:
    """Saves `nb` as NAME.ipynb (with its outputs) and NAME.py (percent script, no outputs)."""
    ipynb, script = (os.path.join(directory, f"{name}.{ext}") for ext in ("ipynb", "py"))
    jupytext.write(nb, ipynb)
    jupytext.write(nb, script, fmt="py:percent")
    return ipynb, script
