"""RoPE frequencies against transformers' own initialisers, and that scaling/windows matter."""

import dataclasses

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jinfer.loader.hf import load_config, load_hf_model
from jinfer.models.config import ModelConfig
from jinfer.models.rope import inverse_frequencies
from tests.test_model_parity import _prompts, _ragged_forward


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64, rope_theta=500000.0),
])
def test_inverse_frequencies_match_transformers(rope_parameters):
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                                  rope_parameters=rope_parameters)
    if rope_parameters["rope_type"] == "default":
        theta, dim = rope_parameters["rope_theta"], 64
        want = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    else:
        want = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf, "cpu")[0].numpy()
    ours = inverse_frequencies(ModelConfig.from_hf_dict(hf.to_dict()))
    np.testing.assert_allclose(ours, want, rtol=1e-6)


def test_llama3_scaling_changes_frequencies(hf_checkpoints):
    cfg = load_config(hf_checkpoints["llama3"])
    plain = dataclasses.replace(cfg, rope_scaling=type(cfg.rope_scaling)())
    assert not np.allclose(inverse_frequencies(cfg), inverse_frequencies(plain))


def test_sliding_window_changes_logits_past_the_window(hf_checkpoints):
    """Guards the Mistral parity test: the window must be in force, not coincidentally harmless."""
    model = load_hf_model(hf_checkpoints["mistral"])
    prompt = _prompts(1, [21])
    windowed = _ragged_forward(model, prompt)[0]
    # The same weights with full attention: a second copy whose own config drops the window
    # before it is ever traced (a config changed in place after tracing would meet the layer
    # program JAX cached for it).
    unwindowed = load_hf_model(hf_checkpoints["mistral"])
    object.__setattr__(unwindowed.config, "sliding_window", None)
    full = _ragged_forward(unwindowed, prompt)[0]
    np.testing.assert_allclose(windowed[:8], full[:8], atol=1e-5)
    assert np.abs(windowed[8:] - full[8:]).max() > 1e-2
