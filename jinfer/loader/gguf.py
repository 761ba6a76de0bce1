"""Loading Llama-family GGUF files (llama.cpp's format) into the NNX model.

A GGUF file holds the model config and the tokenizer as metadata and the weights as tensors,
often quantized. Every tensor type the `gguf` package can dequantize loads, dequantized to the
configured dtype; the model then runs in that dtype (no quantized matmuls). llama.cpp stores the
q/k projections of `llama` files with the rows of each head interleaved for its rotary layout;
they are put back in HF's order, so the weights equal what transformers' GGUF loading produces.

    model, tok = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np

from jinfer.models.config import ModelConfig, RopeScaling

# general.architecture -> the HF architecture whose weights and maths it follows.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp tensor names -> HF names ("{i}" is the block index).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors llama.cpp writes that the model recomputes (rotary tables).
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def find_gguf(path: str) -> str | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a directory without a
    config.json; None when `path` is neither (an HF checkpoint directory wins)."""
    if os.path.isfile(path):
        return path if _has_gguf_magic(path) or path.endswith(".gguf") else None
    if not os.path.isdir(path):
        if path.endswith(".gguf"):
            raise ValueError(f"GGUF file {path!r} does not exist")
        return None
    if os.path.exists(os.path.join(path, "config.json")):
        return None  # an HF checkpoint directory, whatever else it holds
    files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(files)}): name one")
    return os.path.join(path, files[0]) if files else None


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFFile:
    """One GGUF file's metadata and tensors (memory-mapped), with errors that name the file."""

    def __init__(self, path: str):
        from jinfer.loader import gguf_format

        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path!r} does not exist")
        if not _has_gguf_magic(path):
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        self.path = path
        try:
            self.metadata, self.tensors = gguf_format.read(path)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                             f"{type(e).__name__}: {e}") from None

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        value = self.metadata.get(key)
        if value is None:
            raise ValueError(f"{self.path} is missing metadata key {key!r}")
        return value

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{self.path}: unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        return arch

    def dequantized(self, name: str) -> np.ndarray:
        """f32 array of a tensor in numpy's row-major order ([rows, cols] for a matrix)."""
        import gguf

        t = self.tensors[name]
        try:
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {name!r} has unknown GGML type {t.tensor_type}") from None
        if qtype.name in _BLOCKS:
            return _dequantize_blocks(t.data, qtype.name)
        try:
            return np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} has type {qtype.name}, which the gguf package "
                             f"cannot dequantize") from None


# Block types dequantized here with whole-array numpy (the default model's Q4_1 and Q8_0): the
# gguf package applies the same elementwise formulas 16 rows at a time (its per-group overhead
# made the default model's load_model 1.41 s against 1.11 s this way). Bytes, values per block.
_BLOCKS = {"Q4_1": (20, 32), "Q8_0": (34, 32)}
_CHUNK_VALUES = 1 << 22  # rows dequantized together: bounds the temporaries to ~50 MB


def _dequantize_blocks(data: np.ndarray, kind: str) -> np.ndarray:
    """f32 [rows, cols] of a Q4_1 or Q8_0 tensor's bytes [rows, row_bytes], value for value what
    gguf.quants.dequantize gives (tests/test_gguf.py compares them bit for bit)."""
    type_size, block = _BLOCKS[kind]
    rows = data.reshape(-1, data.shape[-1]).view(np.uint8)
    cols = rows.shape[1] // type_size * block
    out = np.empty((rows.shape[0], cols), np.float32)
    step = max(1, _CHUNK_VALUES // max(cols, 1))
    for start in range(0, rows.shape[0], step):
        blocks = rows[start:start + step].reshape(-1, type_size)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        if kind == "Q4_1":  # d * q + m; a block's 16 low nibbles come first, then its 16 high ones
            low = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            qs = blocks[:, 4:]
            q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.float32)
            values = scale * q + low
        else:  # Q8_0: d * q
            values = blocks[:, 2:].view(np.int8).astype(np.float32) * scale
        out[start:start + step] = values.reshape(-1, cols)
    return out.reshape(*data.shape[:-1], cols)


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """ModelConfig from the file's metadata, read as transformers' GGUF loading reads it, with
    one departure: linear RoPE scaling ({arch}.rope.scaling.type) is applied (transformers drops
    it for llama files, which changes such a model's positions), and other scalings are refused."""
    arch = f.architecture
    a = lambda key, default=None: f.get(f"{arch}.{key}", default)  # noqa: E731
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{f.path} is missing metadata key {arch + '.vocab_size'!r} (and has no tokenizer.ggml.tokens)")
    heads = f.require(f"{arch}.attention.head_count")
    if "rope_freqs.weight" in f.tensors:
        raise ValueError(f"{f.path} scales RoPE with a rope_freqs tensor (Llama 3.1-style long context), which "
                         "the GGUF loader does not support; load the model's HF checkpoint instead")
    scaling = a("rope.scaling.type")
    if scaling in (None, "none"):
        rope_scaling = RopeScaling()
    elif scaling == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(a("rope.scaling.factor", 1.0)))
    else:
        raise ValueError(f"{f.path}: unsupported RoPE scaling {arch}.rope.scaling.type={scaling!r}; supported: linear")
    embed = f.require(f"{arch}.embedding_length")
    eos = f.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=int(embed),
        intermediate_size=int(f.require(f"{arch}.feed_forward_length")),
        num_layers=int(f.require(f"{arch}.block_count")), num_heads=int(heads),
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", 0) or (a("rope.dimension_count", 0) if arch != "qwen2" else 0)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(f.require(f"{arch}.context_length")),
        qkv_bias="blk.0.attn_q.bias" in f.tensors, o_bias="blk.0.attn_output.bias" in f.tensors,
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        architecture=ARCHITECTURES[arch])


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleave of q/k ([heads*head_dim, ...] in both orders)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """The HF tensor name of a llama.cpp one; None for a tensor the model does not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def gguf_tensors(f: GGUFFile, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF name -> f32 array of every tensor the model uses, dequantized, q/k rows in HF order."""
    permuted = f.architecture == "llama"  # llama.cpp's qwen2 keeps HF's rotary layout
    out, unknown = {}, []
    for name in f.tensors:
        hf = hf_name(name)
        if hf is None:
            if name not in _IGNORED:
                unknown.append(name)
            continue
        w = f.dequantized(name)
        if permuted and ".attn_q." in name:
            w = _unpermute_rows(w, cfg.num_heads)
        elif permuted and ".attn_k." in name:
            w = _unpermute_rows(w, cfg.num_kv_heads)
        out[hf] = w
    if unknown:
        raise ValueError(f"{f.path} has tensors a {cfg.architecture} cannot use: {unknown[:5]}")
    return out


def load_gguf_model(path: str, *, dtype=None, attention_backend: str = "xla", shardings=None):
    """The LlamaForCausalLM in a GGUF file (or a directory holding one); its tokenizer comes from
    jinfer.loader.gguf_tokenizer.tokenizer_from_gguf.

    dtype: float32 (default) or bfloat16; quantized tensors are dequantized to it. shardings as
    jinfer.loader.hf.load_hf_model takes them."""
    import jax.numpy as jnp

    from jinfer.loader.hf import build_model  # jax loads with a model, not with a tokenizer (routers)

    f = open_gguf(path)
    cfg = config_from_gguf(f)
    try:
        return build_model(cfg, gguf_tensors(f, cfg), dtype=jnp.float32 if dtype is None else dtype,
                           attention_backend=attention_backend, shardings=shardings)
    except ValueError as e:  # a missing or misshapen tensor: say which file
        raise ValueError(f"{f.path}: {e}") from None


def load_sharded(path: str, mesh, *, dtype=None, vocab_parallel: bool = True):
    """A GGUF file's model loaded straight into its shards on a tp mesh (as
    jinfer.loader.hf.load_sharded does for an HF checkpoint)."""
    import jax.numpy as jnp

    from jinfer.loader.hf import tp_shardings  # as in load_gguf_model

    dtype = jnp.float32 if dtype is None else dtype
    shardings = tp_shardings(config_from_gguf(open_gguf(path)), mesh, dtype, vocab_parallel)
    return load_gguf_model(path, dtype=dtype, shardings=shardings)


def open_gguf(path: str) -> GGUFFile:
    """The GGUFFile `path` names (a .gguf file or a directory holding one). Parsing the metadata
    of a real file takes a second or two, so the last files opened are kept (a launch reads the
    tokenizer, then the model, from the same file)."""
    file = find_gguf(path)
    if file is None:
        raise ValueError(f"{path!r} is neither a GGUF file nor a directory holding one")
    st = os.stat(file)
    return _open_cached(os.path.realpath(file), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)
