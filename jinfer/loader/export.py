"""Writing the model as an HF checkpoint directory (config.json, generation_config.json,
model.safetensors): the inverse of jinfer.loader.hf, derived from the same weight_map."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from jinfer.loader.hf import weight_map
from jinfer.models.config import ModelConfig
from jinfer.models.llama import LlamaForCausalLM

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json contents for cfg (dtype names the stored tensors: float32 / bfloat16)."""
    s = cfg.rope_scaling
    out = {
        "architectures": [cfg.architecture], "model_type": _MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
    }
    if s.rope_type != "default":
        out["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    if cfg.architecture == "LlamaForCausalLM":
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError("Llama checkpoints have q/k/v and o biases together or not at all")
        out["attention_bias"] = cfg.qkv_bias
    if cfg.architecture == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
        raise ValueError(f"{cfg.architecture} checkpoints cannot carry sliding_window={cfg.sliding_window}")
    return out


def hf_tensors(model: LlamaForCausalLM, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF tensor name -> array in HF layout.

    Each loader transform is a transpose/reshape, so applying it to an array of flat HF indices
    gives, at every position of our layout, the HF element it came from.
    """
    flat = {tuple(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}
    out = {}
    for path, (name, shape, fn) in weight_map(model.config).items():
        ours = flat[path]
        where = np.asarray(fn(np.arange(int(np.prod(shape))).reshape(shape)))
        hf = np.empty(int(np.prod(shape)), ours.dtype)
        hf[where.ravel()] = ours.ravel()
        out[name] = hf.reshape(shape).astype(dtype)
    return out


def save_hf_model(model: LlamaForCausalLM, out_dir: str, *, dtype: str = "float32") -> None:
    """Writes config.json, generation_config.json and model.safetensors under out_dir."""
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'bfloat16'")
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}, f, indent=2)
    save_file(hf_tensors(model, np_dtype), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
