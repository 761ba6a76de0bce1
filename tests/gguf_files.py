"""Small GGUF files the tests write: a tiny random HF model's weights in several GGML tensor types,
with a byte-level (gpt2) or SentencePiece (llama) tokenizer trained here, laid out as
llama.cpp's converter lays them out (q/k rows interleaved per head for `llama`)."""

from __future__ import annotations

import os
import random

import gguf
import numpy as np
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import decoders, models, pre_tokenizers, trainers

from tests.hf_models import random_model

_WORDS = ("the model reads tokens and writes text def class return import self value cache page kernel "
          "über café naïve 東京 数据 данные 123 4567 3.14 (x) [y] {z} <tag> don't it's we're").split()
CONTROL_GPT2 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 12))]
        lines.append(rng.choice(["", " ", "\t", "\n"]) + " ".join(words) + rng.choice(["", ".", "!\n", "  "]))
    return lines


def gpt2_vocab(size: int = 400) -> dict:
    """Byte-level BPE trained on corpus(): tokenizer.ggml.* fields of a `gpt2` file."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=size, special_tokens=CONTROL_GPT2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = tok.to_str()
    import json
    spec = json.loads(model)["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    # user-defined tokens: one in the byte alphabet, and a run of spaces as llama.cpp stores it
    # (in plain text, which a byte-level vocabulary cannot hold: left out, as HF leaves it out)
    tokens += ["<think>", "    "]
    types = [3 if t in CONTROL_GPT2 else 4 if t in ("<think>", "    ") else 1 for t in tokens]
    return dict(model="gpt2", pre="smollm", tokens=tokens, types=types, merges=merges, scores=None,
                bos=1, eos=2, unk=0, pad=2, add_bos=False)


def llama_vocab(size: int = 420) -> dict:
    """SentencePiece-style BPE (▁ spaces, <0xNN> byte tokens) with scores and no merges: the
    fields llama.cpp writes for a `llama` tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False))
    import json
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += ["<|im_start|>", "<|im_end|>", "<tool>"]
    types = []
    for t in tokens:
        types.append(2 if t == "<unk>" else 3 if t in ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
                     else 6 if t in byte_tokens else 4 if t == "<tool>" else 1)
    scores = [0.0 if ty != 1 else -float(i) for i, (t, ty) in enumerate(zip(tokens, types))]
    return dict(model="llama", pre="default", tokens=tokens, types=types, merges=None, scores=scores,
                bos=1, eos=2, unk=0, pad=None, add_bos=True)


def build_hf(vocab_size: int, *, arch: str = "llama", seed: int = 0, hidden: int = 256, tie: bool = False):
    """A tiny random HF model whose matrices have 256-wide rows (so K-quants apply everywhere)."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    cfg = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return random_model(cfg, seed)


_K_LAYOUT = {Q.Q4_K: ((0, 2), 144), Q.Q5_K: ((0, 2), 176), Q.Q6_K: ((208,), 210)}  # fp16 scale offsets, block bytes


def _k_quant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small finite scales (gguf cannot quantize K types)."""
    offsets, size = _K_LAYOUT[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off in offsets:
        blocks[..., off:off + 2] = np.frombuffer(
            rng.uniform(0.001, 0.004, size=rows * cols // 256).astype(np.float16).tobytes(),
            dtype=np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: str, model, vocab: dict, types: dict[str, object] | None = None, *, arch: str = "llama",
               seed: int = 0, chat_template: str | None = CHAT_TEMPLATE, drop: tuple[str, ...] = (),
               general_arch: str | None = None) -> str:
    """Writes `model` (an HF LlamaForCausalLM / Qwen2ForCausalLM) and `vocab` as a GGUF file.

    types: GGUF tensor name pattern ("attn_q", "ffn_down", "token_embd", ...) -> GGML type; the
    rest are F32. K-quant tensors get random blocks (their dequantized values are what both
    loaders read). Returns path."""
    types = types or {}
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, general_arch or arch)
    w.add_name("tiny test model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["merges"] is not None:
        w.add_token_merges(vocab["merges"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    for key in ("bos", "eos", "unk", "pad"):
        if vocab[key] is not None:
            getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                        "pad": "add_pad_token_id"}[key])(vocab[key])
    w.add_add_bos_token(vocab["add_bos"])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for hf, t in model.state_dict().items():
        x = t.detach().numpy().astype(np.float32)
        if hf == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf == "model.norm.weight":
            name = "output_norm.weight"
        elif hf == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            layer, rest = hf.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_NAMES[module]}.{kind}"
            if arch == "llama" and module == "self_attn.q_proj":
                x = _permute(x, cfg.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                x = _permute(x, cfg.num_key_value_heads)
        if any(d in name for d in drop):
            continue
        qtype = next((q for pat, q in types.items() if pat in name), Q.F32) if x.ndim == 2 else Q.F32
        if qtype in _K_LAYOUT:
            w.add_tensor(name, _k_quant(*x.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path: str):
    """(model, tokenizer) as transformers' own GGUF loading gives them."""
    d, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok
