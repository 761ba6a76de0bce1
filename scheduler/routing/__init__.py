"""Routing across replicas: Preble's E2 and the baselines (policies.py) over a global radix tree
(radix.py), and Preble's workloads (preble_workloads.py). The live router (jinfer/router/) and the
simulator drive the same policies; harness/experiments/routing.py compares them."""
