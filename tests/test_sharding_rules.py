"""Every model parameter names logical axes, and the rules table resolves them."""

import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jinfer.models.config import preset
from jinfer.models.llama import abstract_model
from sharding.rules import KV_LOGICAL_AXES
from sharding.rules import TP_RULES, logical_to_spec


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b", "tiny"])
def test_every_parameter_has_logical_axes_matching_its_rank(name):
    state = nnx.state(abstract_model(preset(name)))  # abstract: no 8B allocation
    count = 0
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.get_value().shape), path
        logical_to_spec(axes, TP_RULES)
        count += 1
    assert count > 0


def test_megatron_layout():
    assert logical_to_spec(("embed", "q_heads", "head_dim"), TP_RULES) == PartitionSpec(None, "tp", None)
    assert logical_to_spec(("q_heads", "head_dim", "embed"), TP_RULES) == PartitionSpec("tp", None, None)
    assert logical_to_spec(("mlp", "embed"), TP_RULES) == PartitionSpec("tp", None)
    assert logical_to_spec(KV_LOGICAL_AXES, TP_RULES) == PartitionSpec("tp", None, None, None)


def test_collisions_and_unknown_axes_raise():
    with pytest.raises(ValueError, match=r"map mesh axes \('tp', 'tp'\) more than once"):
        logical_to_spec(("q_heads", "mlp"), TP_RULES)
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        logical_to_spec(("experts",), TP_RULES)
