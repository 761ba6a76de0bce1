"""The composition root: engines, scheduling policies, drafters, adaptive-TP controllers and
servers built from a resolved launch config (jinfer.launch.resolve).

The only place where the policy package (scheduler/) and the mechanism package (jinfer/) meet:
jinfer defines the interfaces (SchedulingPolicy, Drafter, DraftBudget) and the config's short
names; this module maps each name to its class. A user's own policy or drafter is named as
`module:Class` in the config and loaded here.

    launch = jinfer.launch.resolve(config)
    server = build_server(launch)              # builds the engine too
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json

import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.config import SpeculationConfig
from jinfer.engine import Engine
from jinfer.instances import InstanceGroup, Instances
from jinfer.launch import LaunchConfig, ModelSpec, load_checkpoint, load_model, load_tokenizer, model_config, to_dict
from jinfer.models.llama import abstract_model
from scheduler.adaptive_tp.nitsum import build_control
from scheduler.slo.policies import FirstCome, SloAware, StrictPriority
from scheduler.slo.priority_groups import PriorityGroups
from scheduler.speculation.budget import CostAwareBudget
from scheduler.speculation.das import RolloutDrafter
from scheduler.speculation.drafters import NgramDrafter, SuffixDrafter
from sharding.distributed import mesh_devices
from sharding.tp import make_mesh

DRAFTERS = {"ngram": NgramDrafter, "suffix": SuffixDrafter, "das": RolloutDrafter}
"""speculation.method's short names (jinfer.config.DRAFTERS) -> the Drafter class."""
POLICIES = {"first_come": FirstCome, "strict_priority": StrictPriority, "slo": SloAware,
            "priority_groups": PriorityGroups}
"""engine.scheduling_policy's short names (jinfer.config.POLICIES) -> the SchedulingPolicy class."""


def build_engine(launch: LaunchConfig, policy=None, progress: bool = False):
    """An Engine for the launch config (model loaded, pool sized, buckets compiled if asked;
    progress: a bar while they compile)."""
    spec, opts = launch.model, launch.engine
    if opts.instances:
        return _build_instances(launch, policy, progress)
    mesh = None
    if spec.tp > 1:
        mesh = make_mesh(spec.tp, mesh_devices(spec.tp))  # over every process of a multi-process mesh
    if policy is None and opts.scheduling_policy:
        policy = scheduling_policy(opts.scheduling_policy)
    _admission(policy, opts)
    spec_cfg = launch.speculation
    drafter = build_drafter(spec_cfg)

    def make(model, tok):
        return Engine(model, tok, launch.cache, launch.scheduler, policy, opts, mesh=mesh, progress=progress,
                      drafter=drafter, max_spec_tokens=spec_cfg.max_spec_tokens,
                      draft_budget=build_draft_budget(spec_cfg, drafter))

    if mesh is None and not spec.preset:
        engine = _build_while_loading(spec, make)
    else:
        engine = make(*load_model(spec, mesh))
    if hasattr(policy, "bind"):
        policy.bind(engine.scheduler)
    return engine


def _build_while_loading(spec: ModelSpec, make):
    """make(model, tokenizer) on the checkpoint's shapes while a thread loads its weights, which
    then go in (Engine.update_weights). The engine's construction (its first step bucket traced
    and compiled, or read from the compilation cache: ~2.5 s of a warm start on the default
    model) and the load (~1.3 s, mostly dequantizing) share the two cores instead of taking
    turns."""
    cfg = model_config(spec)  # the file's metadata is read (and kept) before the thread reads it too
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load-weights") as pool:
        loading = pool.submit(load_checkpoint, spec)
        engine = make(abstract_model(cfg, dtype=jnp.dtype(spec.dtype)), load_tokenizer(spec))
        engine.update_weights(nnx.state(loading.result()))
    return engine


def _admission(policy, opts):
    """The policy with its admission check on when engine.slo_admission asks for it
    (ValueError for a policy without one)."""
    if opts.slo_admission:
        if not hasattr(policy, "admission"):
            raise ValueError(f"engine.slo_admission needs a policy with an admission check "
                             f"(engine.scheduling_policy=slo), not {opts.scheduling_policy or 'FCFS'!r}")
        policy.admission = True
    return policy


def _build_instances(launch: LaunchConfig, policy, progress: bool):
    """engine.instances: an InstanceGroup (one engine per device group; each its own policy
    object, built from engine.scheduling_policy), adaptive when engine.adaptive_tp names a
    profile."""
    opts, spec = launch.engine, launch.model
    if policy is not None:
        raise ValueError("engine.instances builds one policy per instance from engine.scheduling_policy; "
                         "pass no policy object")
    if launch.speculation.method:
        raise ValueError("speculation.method with engine.instances is not supported: drafters keep per-engine "
                         "state; serve speculation on a single engine")
    if spec.tp != 1:
        raise ValueError(f"model.tp={spec.tp} with engine.instances={opts.instances}: the instances set the "
                         "TP degrees; leave model.tp at 1")
    if sum(opts.instances) > jax.device_count():
        raise ValueError(f"engine.instances={opts.instances} needs {sum(opts.instances)} devices, "
                         f"{jax.device_count()} available")

    def factory():
        return _admission(scheduling_policy(opts.scheduling_policy), opts)

    if opts.slo_admission and not opts.scheduling_policy:
        raise ValueError("engine.slo_admission needs engine.scheduling_policy=slo")
    if opts.scheduling_policy:
        factory()  # a bad name fails here, before any model loads
    else:
        factory = None
    control = None
    if opts.adaptive_tp:  # a bad profile fails before the model loads
        control = build_control(opts.adaptive_tp, launch.serving.tier_table, opts.instances, jax.device_count(),
                        opts.adaptive_window_s)
    model, tok = load_model(spec)
    instances = Instances(model, tok, list(control.sizes if control else opts.instances), policy_factory=factory,
                          cache_config=launch.cache, scheduler_config=launch.scheduler, options=opts,
                          progress=progress)
    if control is not None and opts.warmup:
        # Every device group a partition may use compiles now, not when a regroup first uses it
        # (the instances keep the programs: a regroup takes them as they are).
        instances.precompile(control.degrees, progress)
    return InstanceGroup(instances, control)




def _load(field: str, value: str):
    """The object a user's `module:Name` value names (a drafter or policy of their own)."""
    module, _, name = value.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}={value!r} cannot be loaded: {e}") from None


def build_draft_budget(config: SpeculationConfig, drafter=None):
    """The DraftBudget of speculation.adaptive (None when off or not speculating): the
    drafter's own (`drafter.draft_budget(config)`, as DAS has) or CostAwareBudget."""
    if not (config.method and config.adaptive):
        return None
    if callable(getattr(drafter, "draft_budget", None)):
        return drafter.draft_budget(config)
    return CostAwareBudget.from_config(config)


def build_drafter(config: SpeculationConfig):
    """The Drafter speculation.method names (a short name in DRAFTERS, or `module:Class` for a
    drafter of one's own; None when off); ValueError naming it."""
    if not config.method:
        return None
    cls = DRAFTERS.get(config.method) or _load("speculation.method", config.method)
    drafter = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    for method in ("start", "propose", "observe", "finish"):
        if not callable(getattr(drafter, method, None)):
            raise ValueError(f"speculation.method={config.method!r} has no {method}() (jinfer.speculation.Drafter)")
    return drafter


def scheduling_policy(spec: str):
    """A SchedulingPolicy from a short name (POLICIES) or `module:Class` (engine.scheduling_policy:
    a policy of one's own); ValueError naming it."""
    policy = (POLICIES.get(spec) or _load("engine.scheduling_policy", spec))()
    if not callable(getattr(policy, "priority", None)):
        raise ValueError(f"engine.scheduling_policy={spec!r} has no priority(request) method")
    return policy


def build_server(launch: LaunchConfig, engine=None):
    """A Server (not started) for the launch config; builds the engine unless given one."""
    # Imported here: a launch loads the serving stack (~250 modules) beside the engine's build
    # (entrypoints.serve), not before it.
    from jinfer.serving.server import Server

    engine = engine if engine is not None else build_engine(launch)
    serving = launch.serving
    if not serving.model_name:
        serving = dataclasses.replace(serving, model_name=launch.model.display_name)
    launch = dataclasses.replace(launch, serving=serving)
    return Server(engine, serving, json.dumps(to_dict(launch)))
