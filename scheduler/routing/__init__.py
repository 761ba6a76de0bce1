"""Routing across replicas: Preble's E2 and the baselines (policies.py) over a global radix tree
(radix.py), Preble's workloads (preble_workloads.py) and the routing experiments the notebooks
run (experiments.py). The live router (jinfer/router/) and the simulator drive the same policies."""
