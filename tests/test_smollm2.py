"""The default model, SmolLM2-135M-Instruct from its GGUF file: fetched (or read from the cache),
loaded by jinfer exactly as transformers loads the same file."""

import dataclasses
import json
import os

import pytest
import torch
import transformers

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.launch import ModelSpec, load_model
from jinfer.loader.gguf import config_from_gguf, open_gguf
from jinfer.model_store import SMOLLM2, resolve_model_path
from jinfer.models.config import preset
from jinfer.sampling_params import SamplingParams
from tests.hf_models import hf_greedy


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model_path("")
    d, name = os.path.split(path)
    return path, load_model(ModelSpec()), transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


def test_default_model_is_smollm2_in_the_cache(smollm2):
    path = smollm2[0]
    assert os.path.basename(path) == SMOLLM2.filename and os.path.getsize(path) > 90e6
    model, tok = smollm2[1]
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and tok.eos_ids == (2,) and not tok.add_bos


def test_smollm2_preset_is_the_files_shape(smollm2):
    """The preset GPU runs build random weights from (the file itself cannot travel there)."""
    cfg, want = config_from_gguf(open_gguf(smollm2[0])), preset("smollm2-135m")
    assert cfg.rms_norm_eps == pytest.approx(want.rms_norm_eps)  # a float32 in the file
    assert dataclasses.replace(cfg, rms_norm_eps=want.rms_norm_eps) == want


def test_default_model_tokenizer_and_chat_template_match_transformers(smollm2):
    _, (_, tok), hf_tok = smollm2
    assert json.loads(tok.backend.to_str()) == json.loads(hf_tok.backend_tokenizer.to_str())
    text = tok.apply_chat_template(CHAT)
    assert text == hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


# Slow: transformers' GGUF loading takes ~15 s and the 30-layer step ~10 s to compile here;
# tests/test_gguf.py checks the same loading path (Q4_1 included) against transformers on
# small files in the default run.
@pytest.mark.slow
def test_default_model_greedy_tokens_match_transformers(smollm2):
    path, (model, tok), _ = smollm2
    d, name = os.path.split(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    text = tok.apply_chat_template(CHAT)
    prompts = [tok.encode(text, add_special_tokens=False), tok.encode("The quick brown fox")]
    # One 64-token bucket for the whole run: a 30-layer step takes ~10 s to compile on 2 cores.
    engine = Engine(model, tok, CacheConfig(page_size=16, num_pages=32),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=2, max_model_len=256),
                    options=EngineOptions(min_token_bucket=64))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == hf_greedy(hf_model, prompt, 16, eos_id=2)
    assert "Paris" in tok.decode(outs[0].token_ids)
