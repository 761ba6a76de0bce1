"""Policy, grouped by concern: routing/ (Preble E2 and the baselines over a global radix tree,
Preble's workloads, the routing experiments), speculation/ (drafters, suffix trees, DAS, the
draft budget), slo/ (SLO-tier and priority scheduling policies), adaptive_tp/ (Nitsum: the
controller, its rate profiles, the live replay and the study), simulation/ (the replica
simulator and Nitsum's) and the step cost model they share (cost_model.py). Each implements an
interface jinfer/ defines; nothing here touches device arrays."""
