"""entrypoints.process.ServerProcess's die_with_parent: a child started with it is stopped when
the process that started it is killed outright (SIGKILL: no clean-up code runs there), as a Ray
replica actor's server must be; one started without it outlives that process."""

import os
import signal
import subprocess
import sys

import pytest

from tests.serving_util import HANG_S, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENT = """
import sys
from entrypoints.process import ServerProcess
p = ServerProcess([], module="tests.idle_server", die_with_parent={flag}).start().wait_ready(60)
print(p.proc.pid, flush=True)
sys.stdin.read()  # until killed (the test holds the pipe open)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running either
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("die_with_parent", [True, False])
def test_a_server_process_dies_with_its_parent_only_when_asked(die_with_parent):
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(flag=die_with_parent)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()  # SIGKILL: the parent runs no clean-up
        parent.wait()
        if die_with_parent:
            assert wait_for(lambda: not _alive(child), HANG_S), "the child outlived its parent"
        else:
            assert _alive(child), "without die_with_parent the child is not tied to its parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
