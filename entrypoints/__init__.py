"""The entry points: the composition root (build.py) that assembles engines, policies and
servers from a launch config, the server and router mains (serve.py, router.py) and the child
process that starts them (process.py). Imports point down: entrypoints -> scheduler -> jinfer."""
