"""Launch configs: files under configs/, absl overrides, resolution into frozen dataclasses."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.launch import EngineOptions, LaunchConfig, ModelSpec, default_config, resolve, to_dict
from jinfer.serving.server import ServingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _parse(config_file, *overrides):
    fv = flags.FlagValues()
    argv = ["prog", *overrides]
    config_flags.DEFINE_config_file("config", os.path.join(CONFIGS, config_file), flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_defaults_resolve_to_the_dataclass_defaults():
    assert resolve(default_config()) == LaunchConfig(ModelSpec(), CacheConfig(), SchedulerConfig(), EngineOptions(),
                                                     ServingConfig())


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py"))
def test_every_config_file_resolves(name):
    launch = resolve(_parse(name))
    assert isinstance(launch.cache, CacheConfig) and isinstance(launch.serving, ServingConfig)
    assert launch.serving.host == "127.0.0.1"  # local unless told otherwise


def test_llama3_8b_config_has_the_8b_shape():
    from jinfer.models.config import preset
    launch = resolve(_parse("llama3_8b.py"))
    assert launch.model.preset == "llama-3.1-8b" and launch.model.dtype == "bfloat16"
    assert preset(launch.model.preset).num_params() > 8e9
    assert launch.scheduler.max_model_len == 8192 and launch.cache.num_pages is None


def test_overrides_reach_every_section():
    launch = resolve(_parse("default.py", "--config.cache.page_size=32", "--config.cache.num_pages=7",
                            "--config.scheduler.max_num_seqs=4", "--config.model.tp=2",
                            "--config.serving.tiers=('gold','silver','bronze')", "--config.serving.auth_token=s3cret",
                            "--config.engine.async_scheduling=false"))
    assert launch.cache.page_size == 32 and launch.cache.num_pages == 7
    assert launch.scheduler.max_num_seqs == 4 and launch.model.tp == 2
    assert launch.serving.tiers == ("gold", "silver", "bronze") and launch.serving.auth_token == "s3cret"
    assert launch.engine.async_scheduling is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        launch.cache.page_size = 8
    d = to_dict(launch)
    assert d["serving"]["auth_token"] == "<redacted>" and "s3cret" not in json.dumps(d)


@pytest.mark.parametrize("section, field, value, message", [
    ("cache", "page_size", 0, "page_size=0"),
    ("scheduler", "max_num_seqs", -1, "max_num_seqs=-1"),
    ("model", "dtype", "float16", "model.dtype='float16'"),
    ("model", "preset", "llama-9000", "unknown model preset 'llama-9000'"),
    ("engine", "attention_backend", "cuda", "engine.attention_backend='cuda'"),
    ("serving", "tiers", ("a", "a"), "tiers=('a', 'a')"),
    ("serving", "metrics_port", 70000, "metrics_port=70000"),
    ("engine", "scheduling_policy", "PriorityGroups", "scheduling_policy='PriorityGroups' must be one of"),
    ("serving", "tiers", ("a:500",), "tier spec 'a:500' must look like"),
    ("engine", "instances", (4, 0), r"instances=(4, 0) must be positive TP degrees"),
    ("engine", "adaptive_tp", "profile.json", "adaptive_tp needs instances"),
])
def test_bad_values_name_the_field(section, field, value, message):
    cfg = default_config()
    setattr(cfg[section], field, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(cfg)


def test_engine_scheduling_policy_is_built_and_bound_from_the_config():
    from entrypoints.build import build_engine, scheduling_policy
    from scheduler.slo.priority_groups import PriorityGroups

    launch = resolve(_parse("test_5m.py", "--config.engine.warmup=False", "--config.engine.compilation_cache=",
                            "--config.engine.scheduling_policy=scheduler.slo.priority_groups:PriorityGroups"))
    engine = build_engine(launch)
    policy = engine.scheduler.policy
    assert isinstance(policy, PriorityGroups) and policy.prefix_cache is engine.scheduler.prefix_cache
    assert engine.generate([[5, 6, 7]])[0].finish_reason == "length"
    for spec, message in [("scheduler.slo.priority_groups:Nope", "cannot be loaded"),
                          ("no_such_module:X", "cannot be loaded"),
                          ("jinfer.config:CacheConfig", "has no priority")]:
        with pytest.raises(ValueError, match=f"engine.scheduling_policy='{spec}'.*{message}"):
            scheduling_policy(spec)


def test_every_short_name_the_config_accepts_has_its_class():
    from entrypoints import build
    from jinfer import config

    assert set(build.DRAFTERS) == set(config.DRAFTERS) and set(build.POLICIES) == set(config.POLICIES)


def test_unknown_fields_and_sections_are_named():
    cfg = default_config()
    cfg.cache.pagesize = 32
    with pytest.raises(ValueError, match=r"cache\.pagesize"):
        resolve(cfg)
    cfg = default_config()
    cfg.router = {}
    with pytest.raises(ValueError, match="unknown config sections.*router"):
        resolve(cfg)
    cfg = default_config()
    cfg.model.path, cfg.model.preset = "/ckpt", "tiny"
    with pytest.raises(ValueError, match="give one"):
        resolve(cfg)


@pytest.mark.parametrize("override, message", [
    ("--config.cache.bogus=1", "unknown config field"),
    ("--config.cache.page_size=0", "config.cache: page_size=0 must be > 0"),
    ("--config.cache.page_size=abc", "invalid literal"),
    ("--config=configs/no_such_config.py", "--config=configs/no_such_config.py: cannot load it"),
])
def test_launch_server_rejects_bad_overrides_in_one_line(override, message):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "launch_server.py"), override],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.multi_device
def test_instances_refuse_what_they_cannot_serve(tmp_path):
    from entrypoints.build import build_engine
    cfg = default_config()
    cfg.engine.instances = (4, 4)
    cfg.speculation.method = "suffix"
    with pytest.raises(ValueError, match="speculation.method with engine.instances is not supported"):
        build_engine(resolve(cfg))
    cfg.speculation.method = ""
    cfg.engine.instances = (8, 8)
    with pytest.raises(ValueError, match=r"engine.instances=\(8, 8\) needs 16 devices"):
        build_engine(resolve(cfg))
    cfg.engine.instances = (4, 4)
    cfg.engine.adaptive_tp = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="engine.adaptive_tp=.*missing.json.*not a readable profile"):
        build_engine(resolve(cfg))


def _small_launch(path: str):
    cfg = default_config()
    cfg.model.path = path
    cfg.cache.page_size, cfg.cache.num_pages = 4, 32
    cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_num_seqs, cfg.scheduler.max_model_len = 32, 4, 48
    cfg.engine.compilation_cache, cfg.engine.attention_backend = "", "xla"
    return resolve(cfg)


def test_build_engine_compiles_while_the_weights_load(hf_checkpoints, monkeypatch):
    """A checkpoint path: the engine is built on its shapes (first bucket compiled) while a thread
    loads the weights, which it then serves: tokens equal an engine built on the loaded model."""
    import threading

    import entrypoints.build as build
    from jinfer.engine import Engine
    from jinfer.loader.hf import load_hf_model
    from jinfer.sampling_params import SamplingParams
    from jinfer.tokenizer import Tokenizer

    path = hf_checkpoints["llama3"]
    launch = _small_launch(path)
    threads, load = [], build.load_checkpoint
    monkeypatch.setattr(build, "load_checkpoint",
                        lambda *a: threads.append(threading.current_thread().name) or load(*a))
    engine = build.build_engine(launch)
    assert threads and threads[0].startswith("load-weights") and not engine.runner.awaiting_weights
    ref = Engine(load_hf_model(path), Tokenizer.from_dir(path), launch.cache, launch.scheduler,
                 options=dataclasses.replace(launch.engine, warmup=False))
    prompts, params = [[1, 2, 3], list(range(5, 25))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in ref.generate(prompts, params)]


def test_an_engine_built_on_shapes_steps_only_once_its_weights_come(hf_checkpoints):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jinfer.engine import Engine
    from jinfer.loader.hf import load_hf_model
    from jinfer.models.llama import abstract_model
    from jinfer.sampling_params import SamplingParams
    from jinfer.tokenizer import Tokenizer

    path = hf_checkpoints["llama3"]
    launch = _small_launch(path)
    model, tok = load_hf_model(path), Tokenizer.from_dir(path)
    engine = Engine(abstract_model(model.config), tok, launch.cache, launch.scheduler,
                    options=dataclasses.replace(launch.engine, warmup=True))
    assert engine.runner.awaiting_weights and len(engine.runner.compiled_buckets()) == 2  # the buckets compiled on shapes
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), request_id="a")
    with pytest.raises(RuntimeError, match=r"update_weights\(\) before step"):
        engine.step()
    state = nnx.state(model)
    wrong = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    with pytest.raises(ValueError, match="update_weights: leaf .* dtype bfloat16"):
        engine.update_weights(wrong)
    assert engine.runner.awaiting_weights
    engine.update_weights(state)
    outs = []
    while not any(o.finished for o in outs):
        outs += engine.step()
    ref = Engine(model, tok, launch.cache, launch.scheduler, options=dataclasses.replace(launch.engine, warmup=False))
    want = ref.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].token_ids
    assert [o for o in outs if o.finished][0].token_ids == want
