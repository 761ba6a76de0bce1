"""Local scheduling policies behind jinfer.scheduling_policy.SchedulingPolicy: first-come,
strict priority and SLO-aware tiers (policies.py), and priority groups (priority_groups.py)."""
