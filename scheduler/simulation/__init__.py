"""Discrete-event simulation over the real Scheduler: replicas behind a router (simulator.py) and
Nitsum's instances (nitsum_sim.py), timed by the step cost model (scheduler/cost_model.py)."""
