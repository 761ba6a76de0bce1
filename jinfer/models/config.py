"""Model configuration: one frozen dataclass for every supported Llama-family architecture."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# HF `architectures` / `model_type` names this decoder covers.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    """One of ROPE_TYPES."""
    factor: float = 1.0
    """Context extension factor (llama3, linear)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained at."""

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type={self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor={self.factor} must be > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                    f"llama3 rope needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor=} {self.low_freq_factor=}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5)."""

    vocab_size: int
    """Rows of the embedding table."""
    hidden_size: int
    """Width of the residual stream (logical axis `embed`)."""
    intermediate_size: int
    """Width of the SwiGLU MLP (logical axis `mlp`)."""
    num_layers: int
    """Number of decoder blocks."""
    num_heads: int
    """Query heads (logical axis `q_heads`)."""
    num_kv_heads: int
    """Key/value heads; num_heads / num_kv_heads query heads share one (GQA)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_heads."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: RopeScaling = RopeScaling()
    """RoPE frequency scaling."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    max_position_embeddings: int = 4096
    """Longest context the model supports, in tokens."""
    qkv_bias: bool = False
    """Whether q/k/v projections carry a bias (Qwen2, Llama with attention_bias)."""
    o_bias: bool = False
    """Whether the output projection carries a bias (Llama with attention_bias)."""
    tie_word_embeddings: bool = False
    """LM head reuses the embedding table (Qwen2.5 small models)."""
    sliding_window: int | None = None
    """Attend only to the last `sliding_window` keys (Mistral v0.1); None = full causal."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id from config.json, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from config.json / generation_config.json."""
    architecture: str = "LlamaForCausalLM"
    """HF architecture name the weights follow."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                  "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be > 0 or None")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count, computed from shapes alone."""
        e, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += e
        layer = attn + 3 * e * i + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.num_layers * layer + self.vocab_size * e + head + e

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from an HF `config.json` dict; raises ValueError on unsupported models."""
        arch = _architecture(hf)
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf.get('hidden_act')!r} is not supported (only 'silu')")
        if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
            raise ValueError("Qwen2 use_sliding_window=True is not supported")
        theta, scaling = _rope(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        sliding = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
        try:
            return cls(
                    vocab_size=int(hf["vocab_size"]),
                    hidden_size=int(hf["hidden_size"]),
                    intermediate_size=int(hf["intermediate_size"]),
                    num_layers=int(hf["num_hidden_layers"]),
                    num_heads=int(hf["num_attention_heads"]),
                    num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
                    head_dim=int(hf.get("head_dim") or 0),
                    rope_theta=theta,
                    rope_scaling=scaling,
                    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                    qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
                    o_bias=attention_bias,
                    tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    sliding_window=int(sliding) if sliding else None,
                    bos_token_id=hf.get("bos_token_id"),
                    eos_token_ids=_as_id_tuple(eos),
                    architecture=arch,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    if archs:
        raise ValueError(f"unsupported architecture {archs!r}; supported: {SUPPORTED_ARCHITECTURES}")
    model_type = hf.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(f"unsupported model_type={model_type!r}; supported: {tuple(_MODEL_TYPES)}")


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type={rope_type!r}; supported: {ROPE_TYPES}")
    kwargs = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                    "original_max_position_embeddings") if k in params}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


# Real shapes, for memory sizing and sharding plans computed without weights.
PRESETS: dict[str, ModelConfig] = {
        "llama-3.1-8b": ModelConfig(
                vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), bos_token_id=128000,
                eos_token_ids=(128001, 128008, 128009)),
        "qwen2.5-7b": ModelConfig(
                vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                num_kv_heads=4, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
                bos_token_id=151643, eos_token_ids=(151645, 151643), architecture="Qwen2ForCausalLM"),
        "mistral-7b": ModelConfig(
                vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                bos_token_id=1, eos_token_ids=(2,), architecture="MistralForCausalLM"),
        # The default model's shape (its GGUF's metadata; a test compares them), for GPU runs
        # that cannot carry the file.
        "smollm2-135m": ModelConfig(
                vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
        # A tiny shape for demos and tests with random weights.
        "tiny": ModelConfig(
                vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                num_kv_heads=2, max_position_embeddings=1024, bos_token_id=256, eos_token_ids=(257,)),
}


def preset(name: str) -> ModelConfig:
    """Returns a named preset; raises ValueError listing the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def scaled_llama(hidden_size: int, num_layers: int, vocab_size: int) -> ModelConfig:
    """A Llama-proportioned config of a given width (head dim 64, 2 query heads per 128 of width
    sharing one KV head per 128, MLP ~2.75x): the random-weight models of the benchmarks."""
    return dataclasses.replace(preset("tiny"), vocab_size=vocab_size, hidden_size=hidden_size,
                               num_heads=hidden_size // 64, num_kv_heads=max(1, hidden_size // 128), head_dim=64,
                               intermediate_size=hidden_size * 11 // 4 // 64 * 64, num_layers=num_layers,
                               max_position_embeddings=4096)
