"""Launch configuration: an ml_collections config file plus absl overrides, resolved once.

A config file (configs/*.py) returns `default_config()` with some fields changed. Its sections
mirror frozen dataclasses: `model` (ModelSpec), `cache` (CacheConfig), `scheduler`
(SchedulerConfig), `speculation` (SpeculationConfig), `engine` (EngineOptions) and `serving`
(ServingConfig). `resolve()` is the
one place a ConfigDict becomes those dataclasses: unknown fields and bad values raise
ValueError naming `section.field`. Tools then call `build_engine()` / `build_server()`.

    python tools/launch_server.py --config=configs/default.py --config.cache.page_size=32
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import sys
import types
import typing

import ml_collections
from ml_collections import config_dict

from jinfer.config import (BACKENDS, DRAFT_BUDGET, DRAFTERS, DTYPES, POLICIES, CacheConfig, EngineOptions, ModelSpec,  # noqa: F401
                           SchedulerConfig, ServingConfig, SpeculationConfig)

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    model: ModelSpec
    cache: CacheConfig
    scheduler: SchedulerConfig
    engine: EngineOptions
    serving: ServingConfig
    speculation: SpeculationConfig = SpeculationConfig()


_CLASSES = {"model": ModelSpec, "cache": CacheConfig, "scheduler": SchedulerConfig,
            "engine": EngineOptions, "serving": ServingConfig, "speculation": SpeculationConfig}


def _optional_type(cls, name):
    """The X of a field typed `X | None`, or None when the field is not optional."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def default_config() -> ml_collections.ConfigDict:
    """Every field of every section at its dataclass default (None fields become typed
    placeholders, so `--config.cache.num_pages=64` still parses)."""
    root = ml_collections.ConfigDict()
    for section, cls in _CLASSES.items():
        d = ml_collections.ConfigDict()
        for f in dataclasses.fields(cls):
            value = f.default
            if value is None:
                value = config_dict.placeholder(_optional_type(cls, f.name))
            setattr(d, f.name, value)
        setattr(root, section, d)
    return root


def resolve(config: ml_collections.ConfigDict) -> LaunchConfig:
    """The one place a config becomes frozen dataclasses; ValueError names the bad field."""
    unknown = sorted(set(config.keys()) - set(_CLASSES))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: {list(_CLASSES)}")
    built = {}
    for section, cls in _CLASSES.items():
        values = dict(config.get(section, {}) or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ValueError(f"unknown fields {[f'{section}.{b}' for b in bad]}; known: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        try:
            built[section] = cls(**values)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(f"{section}.") else f"config.{section}: {msg}") from None
    if built["engine"].attention_backend not in BACKENDS:  # checked here: the registry needs jax
        raise ValueError(f"engine.attention_backend={built['engine'].attention_backend!r}; known: {BACKENDS}")
    return LaunchConfig(**built)


def to_dict(launch: LaunchConfig) -> dict:
    """The resolved config as plain data (logged at launch, reported by GetServerInfo); the
    bearer token is redacted."""
    out = {s: dataclasses.asdict(getattr(launch, s)) for s in _CLASSES}
    if out["serving"]["auth_token"]:
        out["serving"]["auth_token"] = "<redacted>"
    return out


def _bad_override(e: Exception, argv) -> str:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    name = str(e.args[0] if e.args else e).strip("\"'")
    return f"error: unknown config field {name!r} in {bad}; the sections and their fields are in jinfer/launch.py"


def define_config_flag(default_file: str):
    """The --config flag of a tool (a config file, overridable as --config.<section>.<field>).
    ml_collections applies overrides to the default file as the flag is defined, so a bad one
    exits here with one line naming it."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file(
            "config", default_file,
            "Launch config file (configs/*.py); override any field with --config.<section>.<field>=value.")
    except (AttributeError, KeyError) as e:
        sys.exit(_bad_override(e, sys.argv))


def parse_flags(argv):
    """absl flags_parser for tools with a --config flag: a bad override (unknown field, wrong
    type) exits with one line naming it instead of a traceback."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as e:
        sys.exit(_bad_override(e, argv))


def load_tokenizer(spec: ModelSpec):
    """The tokenizer a server for this spec uses (a router tokenizes text prompts with it)."""
    from jinfer.tokenizer import Tokenizer, byte_level_tokenizer

    if spec.preset:
        return byte_level_tokenizer()
    from jinfer.loader import gguf
    from jinfer.loader.hf import load_config
    from jinfer.model_store import resolve_model_path
    path = resolve_model_path(spec.path)
    if gguf.find_gguf(path):
        from jinfer.loader.gguf_tokenizer import tokenizer_from_gguf
        return tokenizer_from_gguf(gguf.open_gguf(path))
    cfg = load_config(path)
    return Tokenizer.from_dir(path, bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)


def model_config(spec: ModelSpec):
    """The ModelConfig of the checkpoint a path spec names, read from its metadata (GGUF keys or
    config.json) without its weights."""
    from jinfer.loader import gguf
    from jinfer.loader.hf import load_config
    from jinfer.model_store import resolve_model_path
    path = resolve_model_path(spec.path)
    return gguf.config_from_gguf(gguf.open_gguf(path)) if gguf.find_gguf(path) else load_config(path)


def load_model(spec: ModelSpec, mesh=None):
    """The model and its tokenizer, as the spec says (loaded straight into shards on a mesh)."""
    tok = load_tokenizer(spec)
    if spec.preset:
        import jax.numpy as jnp

        from jinfer.models.config import preset
        from jinfer.models.llama import init_model
        cfg = dataclasses.replace(preset(spec.preset), bos_token_id=tok.bos_id, eos_token_ids=tuple(tok.eos_ids))
        return init_model(cfg, seed=spec.seed, dtype=jnp.dtype(spec.dtype)), tok
    return _load_checkpoint(spec, mesh), tok


def _load_checkpoint(spec: ModelSpec, mesh=None):
    """The model in the checkpoint (GGUF file or HF directory) a path spec names."""
    import jax.numpy as jnp

    from jinfer.loader import gguf
    from jinfer.loader.hf import load_hf_model, load_sharded
    from jinfer.model_store import resolve_model_path
    dtype = jnp.dtype(spec.dtype)
    path = resolve_model_path(spec.path)
    is_gguf = gguf.find_gguf(path) is not None
    if mesh is not None:
        return (gguf.load_sharded if is_gguf else load_sharded)(path, mesh, dtype=dtype)
    if is_gguf:
        return gguf.load_gguf_model(path, dtype=dtype)
    return load_hf_model(path, dtype=dtype)


def build_engine(launch: LaunchConfig, policy=None, progress: bool = False):
    """An Engine for the launch config (model loaded, pool sized, buckets compiled if asked;
    progress: a bar while they compile)."""
    from jinfer.engine import Engine  # jax loads here, not when a tool only parses its config
    from sharding.tp import make_mesh

    spec, opts = launch.model, launch.engine
    if opts.instances:
        return _build_instances(launch, policy, progress)
    mesh = None
    if spec.tp > 1:
        mesh = make_mesh(spec.tp)
    if policy is None and opts.scheduling_policy:
        policy = scheduling_policy(opts.scheduling_policy)
    if opts.slo_admission:
        if not hasattr(policy, "admission"):
            raise ValueError(f"engine.slo_admission needs a policy with an admission check "
                             f"(engine.scheduling_policy=slo), not {opts.scheduling_policy or 'FCFS'!r}")
        policy.admission = True
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
    import jax.numpy as jnp
    from flax import nnx

    from jinfer.models.llama import abstract_model
    cfg = model_config(spec)  # the file's metadata is read (and kept) before the thread reads it too
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load-weights") as pool:
        loading = pool.submit(_load_checkpoint, spec)
        engine = make(abstract_model(cfg, dtype=jnp.dtype(spec.dtype)), load_tokenizer(spec))
        engine.update_weights(nnx.state(loading.result()))
    return engine


def _build_instances(launch: LaunchConfig, policy, progress: bool):
    """engine.instances: an InstanceGroup (one engine per device group; each its own policy
    object, built from engine.scheduling_policy), adaptive when engine.adaptive_tp names a
    profile."""
    import jax

    from jinfer.instances import InstanceGroup, Instances

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
        made = scheduling_policy(opts.scheduling_policy)
        if opts.slo_admission:
            if not hasattr(made, "admission"):
                raise ValueError(f"engine.slo_admission needs a policy with an admission check "
                                 f"(engine.scheduling_policy=slo), not {opts.scheduling_policy!r}")
            made.admission = True
        return made

    if opts.slo_admission and not opts.scheduling_policy:
        raise ValueError("engine.slo_admission needs engine.scheduling_policy=slo")
    if opts.scheduling_policy:
        factory()  # a bad name fails here, before any model loads
    else:
        factory = None
    control = None
    if opts.adaptive_tp:  # a bad profile fails before the model loads
        build = _load("engine.adaptive_tp", opts.adaptive_tp, "scheduler.nitsum:build_control")
        control = build(opts.adaptive_tp, launch.serving.tier_table, opts.instances, jax.device_count(),
                        opts.adaptive_window_s)
    model, tok = load_model(spec)
    instances = Instances(model, tok, list(control.sizes if control else opts.instances), policy_factory=factory,
                          cache_config=launch.cache, scheduler_config=launch.scheduler, options=opts,
                          progress=progress)
    if control is not None and opts.warmup and opts.compilation_cache:
        # Every device group a partition may use compiles now, not when a regroup first uses it.
        instances.precompile(control.degrees, progress)
    return InstanceGroup(instances, control)


def _load(field: str, value: str, target: str):
    import importlib

    module, _, name = target.partition(":")
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
    return _load("speculation.adaptive", True, DRAFT_BUDGET).from_config(config)


def build_drafter(config: SpeculationConfig):
    """The Drafter speculation.method names (None when off); ValueError naming it. The classes
    live in scheduler/ and are named by string (config.DRAFTERS), as scheduling policies are."""
    if not config.method:
        return None
    cls = _load("speculation.method", config.method, DRAFTERS.get(config.method, config.method))
    drafter = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    for method in ("start", "propose", "observe", "finish"):
        if not callable(getattr(drafter, method, None)):
            raise ValueError(f"speculation.method={config.method!r} has no {method}() (jinfer.speculation.Drafter)")
    return drafter


def scheduling_policy(spec: str):
    """A SchedulingPolicy from a short name (config.POLICIES) or `module:Class`
    (engine.scheduling_policy); ValueError naming it."""
    import importlib

    module, _, name = POLICIES.get(spec, spec).partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine.scheduling_policy={spec!r} cannot be loaded: {e}") from None
    policy = cls()
    if not callable(getattr(policy, "priority", None)):
        raise ValueError(f"engine.scheduling_policy={spec!r} has no priority(request) method")
    return policy


def build_server(launch: LaunchConfig, engine=None):
    """A Server (not started) for the launch config; builds the engine unless given one."""
    from jinfer.serving.server import Server
    engine = engine if engine is not None else build_engine(launch)
    serving = launch.serving
    if not serving.model_name:
        serving = dataclasses.replace(serving, model_name=launch.model.display_name)
    launch = dataclasses.replace(launch, serving=serving)
    return Server(engine, serving, json.dumps(to_dict(launch)))
