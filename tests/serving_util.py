"""Helpers shared by the serving tests (not a test module).

Tests decide on events, never on speed: a deadline here only bounds a hang (a generous one,
for a loaded 2-core machine), and a request a test must see running is held by a StepGate.
"""

import collections
import shutil
import threading
import time

import grpc

from jinfer import TEST_MODEL_DIR

HANG_S = 60.0
"""How long a test waits for something that must happen: a bound on a hang, not a verdict."""


def settled(server, timeout=HANG_S):
    """Waits until nothing is outstanding and every page is free or cached; True if so."""
    engine, deadline = server.loop.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.load()
        if (server.loop.num_outstanding == 0 and server.frontend.num_queued_samples == 0
                and load.free_pages + load.cached_pages == load.num_pages):
            return True
        time.sleep(0.05)
    return False


def wait_for(predicate, timeout=HANG_S) -> bool:
    """Polls `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class StepGate:
    """Stands in for the engine loop's `engine.step` so that the test, not the machine's speed,
    says how far requests get: the engine steps until every request the loop serves has had
    `outputs` steps with output, then takes no step until release(). While held, the loop
    still handles its commands (adds, aborts) between short waits, so a request added then is
    stepped up to `outputs` too, and an abort lands on a request that is certainly running.

    `held` is set the first time the gate holds. Undoing the monkeypatch releases it.
    """

    def __init__(self, monkeypatch, loop, outputs: int = 1):
        engine, step = loop.engine, loop.engine.step
        self.seen: collections.Counter = collections.Counter()  # request id -> steps with its outputs
        self.held, self._released = threading.Event(), threading.Event()

        def gated():  # on the engine thread, as engine.step
            ready = sum(1 for rid, n in self.seen.items() if n >= outputs and engine.is_unfinished(rid))
            if not self._released.is_set() and ready >= loop.num_outstanding:
                self.held.set()
                self._released.wait(0.01)  # then back to the loop: its commands are handled
                return []
            out = step()
            self.seen.update({o.request_id for o in out})
            return out

        monkeypatch.setattr(engine, "step", gated)

    def release(self) -> None:
        self._released.set()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def chat_model_dir(tmp_path_factory) -> str:
    """A copy of the test model with a chat template (it ships none)."""
    path = tmp_path_factory.mktemp("model") / "chat_model"
    shutil.copytree(TEST_MODEL_DIR, path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return str(path)


def rpc_error(fn) -> tuple:
    """(code, details) of the grpc.RpcError fn() raises; AssertionError if it raises none."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    raise AssertionError("the call succeeded; an RPC error was expected")
