"""Harness: what measures and exercises the stack from outside, for the tools, tests and
notebooks: the serving benchmark client and its targets (benchmark.py, bench_targets.py), the
soak test (soak.py), the experiments behind the notebooks and benchmark tools (experiments/) and
a small RL loop that samples rollouts from the engine (rl.py). Above entrypoints/ in the layering:
nothing in the stack imports it."""
