"""Serves jinfer on a Ray cluster: a thin wrapper over `python -m entrypoints.launch_cluster` (its docstring has the usage and flags)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree

import entrypoints.launch_cluster as entry  # noqa: E402 - after the path

__doc__ = entry.__doc__  # --help shows the entry point's usage

if __name__ == "__main__":
    entry.run()
