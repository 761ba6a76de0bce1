"""Tiny random HF models covering every supported architecture feature, saved locally."""

from __future__ import annotations

import json
import os

import torch
import transformers

from jinfer.tokenizer import byte_level_tokenizer

_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
               bos_token_id=256, eos_token_id=257)

VARIANTS = {
    # Llama 3.1 style: llama3 rope scaling, GQA 4 (4 query heads share 1 KV head).
    "llama3": (transformers.LlamaConfig, dict(
        num_key_value_heads=1, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    # Llama 2 style: plain rope, GQA 1 (multi-head), with attention biases.
    "llama2_bias": (transformers.LlamaConfig, dict(num_key_value_heads=4, attention_bias=True)),
    # Mistral: sliding window shorter than the test prompts, GQA 2.
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8, head_dim=16)),
    # Qwen2: q/k/v bias, tied embeddings, GQA 4.
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True,
                                             rope_theta=1000000.0)),
}


def build_tiny(name: str, seed: int = 0):
    """An HF model in float32 with weights scaled so activations are O(1) (not HF's 0.02 init)."""
    config_cls, extra = VARIANTS[name]
    config = config_cls(**_COMMON, **extra)
    config._attn_implementation = "eager"
    return random_model(config, seed)


def random_model(config, seed: int = 0):
    """The HF model of `config` with O(1)-activation random weights (norms ~1, biases ~0.1,
    matrices scaled by fan-in), in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """HF generate's greedy continuation of one unpadded prompt (stops at eos_id)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                           pad_token_id=eos_id, eos_token_id=eos_id)
    return y[0, len(prompt):].tolist()


def save_tiny(name: str, path: str, **save_kwargs) -> str:
    """Saves a tiny model plus a byte-level tokenizer as an HF checkpoint directory."""
    model = build_tiny(name)
    model.save_pretrained(path, **save_kwargs)
    tok = byte_level_tokenizer()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, f)
    return path


def hf_logits(path: str, token_ids: list[int]):
    """float32 logits [len, vocab] of one unpadded sequence from the saved HF model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()
