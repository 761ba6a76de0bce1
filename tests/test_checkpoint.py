"""Orbax save/restore of model state, onto one device and straight into shards."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jinfer.checkpoint import restore_state, save_state
from jinfer.loader.hf import load_hf_model
from jinfer.models.llama import abstract_model
from sharding.rules import TP_RULES, state_shardings


def _flat(model):
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_orbax_round_trip_is_exact(hf_checkpoints, tmp_path):
    model = load_hf_model(hf_checkpoints["qwen2"])
    save_state(str(tmp_path / "ckpt"), model)
    restored = restore_state(str(tmp_path / "ckpt"), abstract_model(model.config))
    want, got = _flat(model), _flat(restored)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.multi_device
def test_restore_places_params_into_target_shards(hf_checkpoints, tmp_path):
    model = load_hf_model(hf_checkpoints["llama2_bias"])  # 4 KV heads: shardable over tp=4
    save_state(str(tmp_path / "ckpt"), model)
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    abstract = abstract_model(model.config)
    shardings = state_shardings(nnx.state(abstract), mesh, TP_RULES)
    restored = restore_state(str(tmp_path / "ckpt"), abstract, shardings)
    q = restored.layers[0].attn.q_proj.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tp", None)
    assert {s.data.shape for s in q.addressable_shards} == {(64, 1, 16)}
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(_flat(restored)[k], v)


def test_save_refuses_to_overwrite(hf_checkpoints, tmp_path):
    model = load_hf_model(hf_checkpoints["qwen2"])
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        save_state(str(tmp_path / "ckpt"), model)
    with pytest.raises(ValueError, match="does not exist"):
        restore_state(str(tmp_path / "missing"), abstract_model(model.config))


@pytest.mark.multi_device
def test_hf_load_places_params_into_target_shards(hf_checkpoints):
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    path = hf_checkpoints["mistral"]  # 2 KV heads: shardable over tp=2
    plain = load_hf_model(path)
    shardings = state_shardings(nnx.state(abstract_model(plain.config)), mesh, TP_RULES)
    sharded = load_hf_model(path, shardings=shardings)
    up = sharded.layers[1].mlp.up_proj.get_value()
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    assert {s.data.shape for s in up.addressable_shards} == {(64, 64)}
    for k, v in _flat(plain).items():
        np.testing.assert_array_equal(_flat(sharded)[k], v)
