"""HF checkpoint loading: sharded files, config parsing, tokenizer, and errors named by message."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from jinfer.loader.hf import load_config, load_hf_model
from jinfer.loader.safetensors_io import open_tensors
from jinfer.models.config import ModelConfig, RopeScaling, preset
from jinfer.tokenizer import Tokenizer
from tests import hf_models
from tests.test_model_parity import _prompts, _ragged_forward


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def test_sharded_index_checkpoint_loads_identically(hf_checkpoints, tmp_path):
    sharded = hf_models.save_tiny("qwen2", str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    prompts = _prompts(0, [6, 3])
    a = _ragged_forward(load_hf_model(sharded), prompts)
    b = _ragged_forward(load_hf_model(hf_checkpoints["qwen2"]), prompts)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_config_parses_llama3_rope_and_eos(hf_checkpoints):
    cfg = load_config(hf_checkpoints["llama3"])
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert (cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim) == (1, 4, 16)
    assert cfg.eos_token_ids == (257,) and cfg.bos_token_id == 256
    qwen = load_config(hf_checkpoints["qwen2"])
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    assert load_config(hf_checkpoints["mistral"]).sliding_window == 8


def test_legacy_rope_scaling_format_parses():
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
              num_hidden_layers=1, num_attention_heads=2, rope_theta=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                high_freq_factor=4.0, original_max_position_embeddings=8192),
              eos_token_id=[1, 2])
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == "llama3"
    assert cfg.eos_token_ids == (1, 2) and cfg.num_kv_heads == 2


def test_presets_size_real_models_abstractly():
    assert abs(preset("llama-3.1-8b").num_params() - 8.03e9) / 8.03e9 < 0.01
    assert abs(preset("qwen2.5-7b").num_params() - 7.62e9) / 7.62e9 < 0.01
    assert abs(preset("mistral-7b").num_params() - 7.25e9) / 7.25e9 < 0.01
    assert preset("llama-3.1-8b").kv_bytes_per_token(2) == 131072  # 32 layers × 2 × 8 × 128 × 2 B
    with pytest.raises(ValueError, match="unknown model preset 'llama-9'"):
        preset("llama-9")


def test_tokenizer_reads_special_ids_from_files(hf_checkpoints):
    tok = Tokenizer.from_dir(hf_checkpoints["llama3"])
    assert tok.bos_id == 256 and tok.eos_ids == (257,)
    ids = tok.encode("print('hé')")
    assert ids[0] == 256 and tok.decode(ids) == "print('hé')"
    assert tok.encode("x", add_bos=False) == [ord("x")]


@pytest.mark.parametrize("bad, message", [
    (dict(num_hidden_layers=0), "num_layers=0 must be > 0"),
    (dict(num_key_value_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "unsupported rope_type='yarn'"),
])
def test_bad_config_values_are_named(hf_checkpoints, tmp_path, bad, message):
    path = _copy(hf_checkpoints["llama3"], tmp_path)
    cfg_path = os.path.join(path, "config.json")
    hf = json.load(open(cfg_path))
    hf.update(bad)
    json.dump(hf, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_model(path)


def test_unsupported_architecture_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama3"], tmp_path)
    cfg_path = os.path.join(path, "config.json")
    hf = json.load(open(cfg_path))
    hf["architectures"] = ["GPT2LMHeadModel"]
    json.dump(hf, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load_hf_model(path)


def test_missing_files_are_named(hf_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="model directory '/nonexistent' does not exist"):
        load_hf_model("/nonexistent")
    path = _copy(hf_checkpoints["llama3"], tmp_path, "no_weights")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="missing file .*model.safetensors"):
        load_hf_model(path)
    path = _copy(hf_checkpoints["llama3"], tmp_path, "no_config")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ValueError, match="missing file .*config.json"):
        load_hf_model(path)
    path = _copy(hf_checkpoints["llama3"], tmp_path, "no_tok")
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.raises(ValueError, match="missing file .*tokenizer.json"):
        Tokenizer.from_dir(path)


def test_missing_shard_file_is_named(tmp_path):
    path = hf_models.save_tiny("llama3", str(tmp_path / "sharded"), max_shard_size="40KB")
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(ValueError, match=f"missing file .*{shard}"):
        load_hf_model(path)


def _rewrite_safetensors(path, edit):
    from safetensors.numpy import save_file
    tensors = {k: np.array(v) for k, v in open_tensors(path).items()}
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama3"], tmp_path)
    _rewrite_safetensors(os.path.join(path, "model.safetensors"),
                         lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf_model(path)


def test_misshaped_tensor_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama3"], tmp_path)
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    _rewrite_safetensors(os.path.join(path, "model.safetensors"), edit)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 64\), "
                                         r"expected \(16, 64\)"):
        load_hf_model(path)


def test_corrupt_safetensors_is_named(hf_checkpoints, tmp_path):
    path = _copy(hf_checkpoints["llama3"], tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_hf_model(path)


def test_bad_dtype_is_named(hf_checkpoints):
    with pytest.raises(ValueError, match="dtype=float16 must be float32 or bfloat16"):
        load_hf_model(hf_checkpoints["llama3"], dtype="float16")


def test_bf16_checkpoint_loads(tmp_path):
    import torch
    model = hf_models.build_tiny("llama3").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    tensors = open_tensors(str(tmp_path / "bf16" / "model.safetensors"))
    assert str(tensors["model.embed_tokens.weight"].dtype) == "bfloat16"
    ours = load_hf_model(str(tmp_path / "bf16"))
    want = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(ours.embed.get_value()), want)


def test_model_config_rejects_nonsense():
    base = preset("tiny")
    with pytest.raises(ValueError, match="vocab_size=0 must be > 0"):
        dataclasses.replace(base, vocab_size=0)
    with pytest.raises(ValueError, match="sliding_window=0 must be > 0 or None"):
        dataclasses.replace(base, sliding_window=0)
