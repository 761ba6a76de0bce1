"""A plain causal forward over dense [batch, length] token blocks, for training.

The inference forward works on a ragged batch over a paged cache; training needs neither. This
path reuses the model's own projections, norms and MLP and replaces only the attention core
with dense causal attention, so a trained model is the same module the engine serves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jinfer.models.llama import LlamaForCausalLM


def causal_forward(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Logits f32[B, L, vocab] for token blocks i32[B, L], each block starting at position 0."""
    cfg = model.config
    b, length = ids.shape
    pos = jnp.tile(jnp.arange(length, dtype=jnp.int32), b)
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    x = model.embed[...][ids.reshape(-1)]
    for layer in model.layers:
        q, k, v = layer.attn.project(layer.input_norm(x), pos)
        out = jax.nn.dot_product_attention(
            q.reshape(b, length, cfg.num_heads, cfg.head_dim),
            k.reshape(b, length, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(b, length, cfg.num_kv_heads, cfg.head_dim),
            scale=cfg.head_dim ** -0.5, is_causal=True, local_window_size=window)
        x = x + layer.attn.output(out.reshape(b * length, cfg.num_heads, cfg.head_dim))
        x = x + layer.mlp(layer.post_attn_norm(x))
    return model.logits(model.final_norm(x)).reshape(b, length, -1)


def next_token_loss(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of predicting ids[:, 1:] from ids[:, :-1]."""
    logits = causal_forward(model, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
