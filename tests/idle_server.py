"""A stand-in server for entrypoints.process.ServerProcess tests: writes its port file (port 0,
its pid) and waits for SIGTERM, then exits 0. `python -m tests.idle_server --port_file=F`."""

import json
import os
import signal
import sys
import threading


def main() -> None:
    port_file = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--port_file="))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    with open(f"{port_file}.tmp", "w") as f:
        json.dump({"port": 0, "pid": os.getpid()}, f)
    os.replace(f"{port_file}.tmp", port_file)
    while not stop.wait(0.5):
        pass


if __name__ == "__main__":
    main()
