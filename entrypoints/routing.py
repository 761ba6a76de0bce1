"""The live router composed from a policy name: the relay (jinfer/router/) given a routing policy
from scheduler/routing/policies.py. No jax is loaded: a router process holds no model."""

from __future__ import annotations

from jinfer.router.config import RouterConfig
from jinfer.router.server import RouterServer
from scheduler.cost_model import CostModel
from scheduler.routing.policies import ROUTERS, E2Options, make_router


def router_server(targets: list[str], policy: str = "preble-e2", cost: CostModel | None = None,
                  options: E2Options = E2Options(), config: RouterConfig = RouterConfig(),
                  tokenizer=None) -> RouterServer:
    """A RouterServer (not started) routing with the named policy (ROUTERS), built once the
    replicas answered, with their smallest KV pool as its capacity. cost: the cost model
    preble-e2 needs (tools/profile_engine.py fits one to the replicas' engine); options: E2's.
    ValueError naming a bad policy before anything connects."""
    if policy not in ROUTERS:
        raise ValueError(f"unknown routing policy {policy!r}; known: {ROUTERS}")
    if policy == "preble-e2" and cost is None:
        raise ValueError("policy preble-e2 needs a cost model (tools/profile_engine.py makes one)")
    return RouterServer(targets, lambda n, capacity: make_router(policy, n, cost, capacity, options),
                        config, tokenizer)
