"""Adaptive tensor parallelism (Nitsum): the controller that regroups devices by load (nitsum.py),
its rate profiles (profile.py), the live replay (live.py) and the study (study.py)."""
