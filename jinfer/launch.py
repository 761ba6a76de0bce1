"""Launch configuration: an ml_collections config file plus absl overrides, resolved once.

A config file (configs/*.py) returns `default_config()` with some fields changed. Its sections
mirror frozen dataclasses: `model` (ModelSpec), `cache` (CacheConfig), `scheduler`
(SchedulerConfig), `speculation` (SpeculationConfig), `engine` (EngineOptions) and `serving`
(ServingConfig). `resolve()` is the
one place a ConfigDict becomes those dataclasses: unknown fields and bad values raise
ValueError naming `section.field`. It also loads what a spec names (tokenizer, model config,
weights); entrypoints.build makes engines, policies and servers from the resolved config.

    python tools/launch_server.py --config=configs/default.py --config.cache.page_size=32
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing

import ml_collections
from ml_collections import config_dict

from jinfer.config import (BACKENDS, CacheConfig, EngineOptions, ModelSpec,  # noqa: F401
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
    type) or a config file that cannot be loaded exits with one line naming it instead of a
    traceback."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as e:
        sys.exit(_bad_override(e, argv))
    if "config" in flags.FLAGS:  # a config file that cannot be loaded fails only when first read
        try:
            flags.FLAGS.config.keys()
        except OSError as e:
            sys.exit(f"error: --config={flags.FLAGS['config'].config_filename}: cannot load it "
                     f"({str(e).strip().splitlines()[-1].strip()})")
    return rest


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
    return load_checkpoint(spec, mesh), tok


def load_checkpoint(spec: ModelSpec, mesh=None):
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
