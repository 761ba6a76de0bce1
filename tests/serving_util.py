"""Helpers shared by the serving tests (not a test module)."""

import time


def settled(server, timeout=30.0):
    """Waits until nothing is outstanding and every page is free or cached; True if so."""
    engine, deadline = server.loop.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.load()
        if (server.loop.num_outstanding == 0 and server.frontend.num_queued_samples == 0
                and load.free_pages + load.cached_pages == load.num_pages):
            return True
        time.sleep(0.05)
    return False
