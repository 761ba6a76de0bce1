"""Runs the research notebooks top to bottom and saves them with their outputs.

  python tools/run_notebooks.py                 # every notebook at full size (make notebooks)
  python tools/run_notebooks.py --size=small --notebooks=prefix_routing

Each notebook's source is its percent script notebooks/NAME.py; it runs in a fresh python3
kernel with JINFER_NOTEBOOK_SIZE=--size and 8 fake CPU devices, and is written back as
notebooks/NAME.ipynb (cells with outputs) and NAME.py (cells only). A cell error stops the run
with the failing cell named; nothing is written for that notebook.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("size", "full", ["small", "full"], "Study size the notebooks run at.")
flags.DEFINE_list("notebooks", [], "Notebook names (default: all of them).")
flags.DEFINE_integer("timeout", 1800, "Seconds one cell may run.", lower_bound=1)
flags.DEFINE_string("out_dir", "", "Write the executed notebooks here instead of notebooks/.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from harness.experiments import notebooks

    names = FLAGS.notebooks or list(notebooks.NAMES)
    unknown = sorted(set(names) - set(notebooks.NAMES))
    if unknown:
        raise app.UsageError(f"unknown notebooks {unknown}; known: {list(notebooks.NAMES)}")
    out_dir = FLAGS.out_dir or notebooks.NOTEBOOKS_DIR
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        start = time.perf_counter()
        nb = notebooks.read(os.path.join(notebooks.NOTEBOOKS_DIR, f"{name}.py"))
        notebooks.execute(nb, FLAGS.size, timeout=FLAGS.timeout)
        paths = notebooks.write(nb, name, out_dir)
        print(f"{name}: ran at size {FLAGS.size} in {time.perf_counter() - start:.0f} s -> {', '.join(paths)}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    app.run(main)
