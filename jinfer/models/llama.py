"""One Flax NNX decoder for Llama 2/3/3.1, Mistral and Qwen2/2.5.

Every parameter names its logical axes (`out_sharding` metadata); sharding/rules.py maps them to mesh
axes, so this file holds no parallelism. Letters in einsum strings: t tokens, e embed,
n query heads, k kv heads, h head_dim, m mlp, v vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.attention import AttentionMetadata, get_backend
from jinfer.kv_cache import KVCache
from jinfer.models.config import ModelConfig
from jinfer.models.rope import apply_rope, inverse_frequencies


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, fan_in: int | None = None, init: str = "normal"):
    """A parameter with logical axes; created lazily-sharded so no mesh is needed to build it.
    rngs None: a shape only (abstract_model)."""
    if rngs is None:
        value = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = (fan_in or shape[0]) ** -0.5
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    with nnx.use_eager_sharding(False):
        return nnx.Param(value, out_sharding=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), ("norm",), dtype, init="ones")

    def __call__(self, x):
        # Normalise in f32, cast back, then scale: the order HF uses, so bf16 rounds the same.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str, *, dtype, rngs: nnx.Rngs):
        e, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.backend = backend
        self.q_proj = _param(rngs, (e, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = _param(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = _param(rngs, (e, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = _param(rngs, (n, h, e), ("q_heads", "head_dim", "embed"), dtype, fan_in=n * h)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), dtype, init="zeros")
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (e,), ("norm",), dtype, init="zeros")

    def project(self, x, positions):
        """q f[T, heads, head_dim] and k, v f[T, kv_heads, head_dim], biases and RoPE applied."""
        q = jnp.einsum("te,enh->tnh", x, self.q_proj[...])
        k = jnp.einsum("te,ekh->tkh", x, self.k_proj[...])
        v = jnp.einsum("te,ekh->tkh", x, self.v_proj[...])
        if self.cfg.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        inv_freq = inverse_frequencies(self.cfg)  # numpy constant, folded into the program
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def output(self, out):
        """The heads' outputs f[T, heads, head_dim] back to the residual stream."""
        # One contracting dimension (heads x head_dim flattened, a free reshape): contracting
        # (n, h) directly made XLA's CPU backend copy the weight into another layout every step.
        n, h, e = self.o_proj.shape
        y = jnp.dot(out.reshape(-1, n * h), self.o_proj[...].reshape(n * h, e))
        return y + self.o_bias[...] if self.cfg.o_bias else y

    def __call__(self, x, positions, k_pages, v_pages, md: AttentionMetadata):
        q, k, v = self.project(x, positions)
        out, k_pages, v_pages = get_backend(self.backend)(
            q, k, v, k_pages, v_pages, md, sm_scale=self.cfg.head_dim ** -0.5,
            sliding_window=self.cfg.sliding_window)
        return self.output(out), k_pages, v_pages


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), dtype)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), dtype)

    def __call__(self, x):
        gate = jnp.einsum("te,em->tm", x, self.gate_proj[...])
        up = jnp.einsum("te,em->tm", x, self.up_proj[...])
        return jnp.einsum("tm,me->te", jax.nn.silu(gate) * up, self.down_proj[...])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, backend: str, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, backend, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, k_pages, v_pages, md):
        with jax.named_scope("attention"):
            h, k_pages, v_pages = self.attn(self.input_norm(x), positions, k_pages, v_pages, md)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attn_norm(x))
        return x, k_pages, v_pages


class LlamaForCausalLM(nnx.Module):
    """The decoder over a ragged batch and a paged KV cache.

    Call with input_ids i32[T], positions i32[T], a KVCache and AttentionMetadata; optionally
    logits_indices i32[N] to project only those rows. Returns (logits f32[T or N, vocab], KVCache).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "xla",
                 rngs: nnx.Rngs | None):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype,
                            fan_in=cfg.hidden_size)
        self.layers = nnx.List(
            [DecoderLayer(cfg, attention_backend, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(self, input_ids, positions, kv_cache: KVCache, md: AttentionMetadata,
                 logits_indices=None):
        x = self.embed[...][input_ids]  # [T, E]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            with jax.named_scope(f"layer_{i}"):
                x, k_pages, v_pages = _layer(graphdef, state, x, positions, kv_cache.k[i], kv_cache.v[i], md)
            new_k.append(k_pages)
            new_v.append(v_pages)
        x = self.final_norm(x)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(x), KVCache(tuple(new_k), tuple(new_v))

    def logits(self, x):
        """f32[T, vocab] from final-normed hidden states f[T, embed]."""
        if self.config.tie_word_embeddings:
            return jnp.einsum("te,ve->tv", x, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("te,ev->tv", x, self.lm_head[...], preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,), inline=True)
def _layer(graphdef, state, x, positions, k_pages, v_pages, md):
    """One decoder layer as a function of its weights. The layers share one graphdef, so JAX
    traces and lowers the layer once per step shape and the step calls it num_layers times
    (XLA inlines the calls: the compiled step is the same as with the layers written out).
    Tracing each layer anew took ~80 ms per layer of the default model's 30 on 2 CPU cores, a
    warm start's largest part after loading."""
    return nnx.merge(graphdef, state)(x, positions, k_pages, v_pages, md)


def set_attention_backend(model: LlamaForCausalLM, name: str) -> None:
    """Sets every layer's attention backend on this model object. Engines built from the model
    afterwards use it; a runner already built keeps the graph it split (Engine calls this
    before building its runner)."""
    get_backend(name)  # raises ValueError naming the known backends
    for layer in model.layers:
        layer.attn.backend = name


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32,
               attention_backend: str = "xla") -> LlamaForCausalLM:
    """A randomly initialised model (demos, tests, benchmarks)."""
    return LlamaForCausalLM(cfg, dtype=dtype, attention_backend=attention_backend, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "xla"):
    """The model with ShapeDtypeStructs in place of arrays: no allocation, no random numbers,
    nothing traced (nnx.eval_shape of init_model gives the same and took ~1.3 s for the default
    model, a warm start's second-largest part)."""
    return LlamaForCausalLM(cfg, dtype=dtype, attention_backend=attention_backend, rngs=None)
