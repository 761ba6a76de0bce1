"""Loading HF checkpoint directories (config.json + safetensors) into the NNX model."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinfer.loader.safetensors_io import open_tensors
from jinfer.models.config import ModelConfig
from jinfer.models.llama import LlamaForCausalLM, abstract_model
from sharding.tp import TPLayout

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_config(model_dir: str) -> ModelConfig:
    """config.json (+ generation_config.json's EOS ids when present) -> ModelConfig."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist")
    hf = _read_json(os.path.join(model_dir, "config.json"))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        gen = _read_json(gen_path)
        if gen.get("eos_token_id") is not None:
            hf = {**hf, "eos_token_id": gen["eos_token_id"]}
        if hf.get("bos_token_id") is None and gen.get("bos_token_id") is not None:
            hf = {**hf, "bos_token_id": gen["bos_token_id"]}
    return ModelConfig.from_hf_dict(hf)


def checkpoint_tensors(model_dir: str) -> dict[str, np.ndarray]:
    """Name -> memory-mapped array over model.safetensors or the sharded index's files."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, shard)
            if not os.path.exists(path):
                raise ValueError(f"missing file {path} (named in {index})")
            tensors.update(open_tensors(path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"tensors named in {index} are absent from the shards: {missing[:5]}")
        return tensors
    if os.path.exists(single):
        return open_tensors(single)
    raise ValueError(f"missing file {single} (and no model.safetensors.index.json) in {model_dir}")


def _linear_in_heads(heads: int, head_dim: int) -> Callable:
    # HF [heads*head_dim, embed] -> ours [embed, heads, head_dim]
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def weight_map(cfg: ModelConfig) -> dict[tuple, tuple[str, tuple[int, ...], Callable]]:
    """Our state path -> (HF tensor name, HF shape, HF->ours transform)."""
    e, m, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    same = lambda w: w
    out = {("embed",): ("model.embed_tokens.weight", (v, e), same),
           ("final_norm", "scale"): ("model.norm.weight", (e,), same)}
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = ("lm_head.weight", (v, e), lambda w: w.T)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {
            ("input_norm", "scale"): ("input_layernorm.weight", (e,), same),
            ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", (e,), same),
            ("attn", "q_proj"): ("self_attn.q_proj.weight", (n * h, e), _linear_in_heads(n, h)),
            ("attn", "k_proj"): ("self_attn.k_proj.weight", (k * h, e), _linear_in_heads(k, h)),
            ("attn", "v_proj"): ("self_attn.v_proj.weight", (k * h, e), _linear_in_heads(k, h)),
            ("attn", "o_proj"): ("self_attn.o_proj.weight", (e, n * h), lambda w: w.T.reshape(n, h, e)),
            ("mlp", "gate_proj"): ("mlp.gate_proj.weight", (m, e), lambda w: w.T),
            ("mlp", "up_proj"): ("mlp.up_proj.weight", (m, e), lambda w: w.T),
            ("mlp", "down_proj"): ("mlp.down_proj.weight", (e, m), lambda w: w.T),
        }
        if cfg.qkv_bias:
            layer[("attn", "q_bias")] = ("self_attn.q_proj.bias", (n * h,), lambda b: b.reshape(n, h))
            layer[("attn", "k_bias")] = ("self_attn.k_proj.bias", (k * h,), lambda b: b.reshape(k, h))
            layer[("attn", "v_bias")] = ("self_attn.v_proj.bias", (k * h,), lambda b: b.reshape(k, h))
        if cfg.o_bias:
            layer[("attn", "o_bias")] = ("self_attn.o_proj.bias", (e,), same)
        for path, (name, shape, fn) in layer.items():
            out[("layers", i) + path] = (p + name, shape, fn)
    return out


def load_state_arrays(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype) -> dict[tuple, np.ndarray]:
    """Checks names and shapes, converts to our layout and dtype (host numpy, not yet on device)."""
    mapping = weight_map(cfg)
    out = {}
    for path, (name, shape, fn) in mapping.items():
        if name not in tensors:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        w = tensors[name]
        if tuple(w.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {shape}")
        out[path] = np.asarray(fn(w)).astype(dtype, copy=False)  # no copy when only a view changed
    expected = {name for name, _, _ in mapping.values()}
    if cfg.tie_word_embeddings:
        expected.add("lm_head.weight")  # some tied checkpoints still save it
    unknown = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        log.warning("ignoring %d tensors the model does not use, e.g. %s", len(unknown), unknown[:3])
    return out


def load_hf_model(model_dir: str, *, dtype=jnp.float32, attention_backend: str = "xla",
                  shardings=None) -> LlamaForCausalLM:
    """Builds the model from an HF checkpoint directory without random initialisation.

    dtype: float32 or bfloat16 for parameters and activations. shardings: optional nnx.State with
    a jax.sharding.Sharding in place of each Variable (sharding.rules.state_shardings); each
    parameter goes from the memory-mapped file straight into its shards.
    """
    cfg = load_config(model_dir)
    return build_model(cfg, checkpoint_tensors(model_dir), dtype=dtype, attention_backend=attention_backend,
                       shardings=shardings)


def build_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                attention_backend: str = "xla", shardings=None) -> LlamaForCausalLM:
    """The model from HF-named host tensors (memory-mapped or in memory); see load_hf_model."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype={dtype} must be float32 or bfloat16")
    arrays = load_state_arrays(cfg, tensors, dtype)
    abstract = abstract_model(cfg, dtype=dtype, attention_backend=attention_backend)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    sharding_of = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    leaves = []
    for path, var in flat:
        key = tuple(path)
        if key not in arrays:
            raise AssertionError(f"no checkpoint mapping for model parameter {key}")
        target = sharding_of.get(key)
        value = jax.device_put(arrays.pop(key), target) if target is not None else jnp.asarray(arrays.pop(key))
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def tp_shardings(cfg: ModelConfig, mesh, dtype, vocab_parallel: bool = True):
    """The nnx.State of target shardings for this model on a tp mesh (ValueError naming what
    tp fails to divide)."""
    layout = TPLayout.for_model(cfg, mesh, vocab_parallel)
    return layout.state_shardings(nnx.state(abstract_model(cfg, dtype=dtype)))


def load_sharded(model_dir: str, mesh, *, dtype=None, vocab_parallel: bool = True) -> LlamaForCausalLM:
    """An HF checkpoint loaded straight into its shards on a tp mesh (sharding.tp.make_mesh):
    each parameter goes from the memory-mapped file to its devices, never whole onto one
    device first (jinfer.loader.gguf.load_sharded: the same for a GGUF file)."""
    dtype = jnp.float32 if dtype is None else dtype
    shardings = tp_shardings(load_config(model_dir), mesh, dtype, vocab_parallel)
    return load_hf_model(model_dir, dtype=dtype, shardings=shardings)
