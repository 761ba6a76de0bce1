"""The embedded test model: real HF files (transformers agrees on greedy tokens), within its
size budget, with a model card; and the training tool that makes it, end to end at toy size."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import torch
import transformers

from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):"]


def _jinfer_greedy(path, prompts, max_tokens):
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=16, num_pages=32),
                 SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=128))
    return [o.token_ids for o in eng.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))]


def _hf_greedy(path, prompt_ids, max_tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"]
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_tokens, pad_token_id=eos[0])
        out.append(y[0, len(ids):].tolist())
    return out


def test_test_model_is_real_hf_format_and_matches_transformers():
    files = set(os.listdir(TEST_MODEL_DIR))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files
    size = sum(os.path.getsize(os.path.join(TEST_MODEL_DIR, f)) for f in files)
    assert size <= 25 * 2**20
    tok = Tokenizer.from_dir(TEST_MODEL_DIR)
    hf_tok = transformers.AutoTokenizer.from_pretrained(TEST_MODEL_DIR)
    for p in PROMPTS:
        assert hf_tok(p)["input_ids"] == tok.encode(p)  # BOS + the same BPE ids
    ours = _jinfer_greedy(TEST_MODEL_DIR, PROMPTS, 24)
    theirs = _hf_greedy(TEST_MODEL_DIR, [tok.encode(p) for p in PROMPTS], 24)
    assert ours == theirs
    # A trained model, not noise: a method body continues with indented code using self.
    text = tok.decode(ours[2])
    assert text.startswith("\n        ") and "self." in text, text


def test_model_card_records_training():
    card = open(os.path.join(TEST_MODEL_DIR, "README.md")).read()
    for part in ("## Training", "| step | train loss | held-out loss |", "nats/byte", "## Greedy samples",
                 "python tools/train_default_model.py"):
        assert part in card


def test_causal_forward_matches_the_serving_forward():
    import jax.numpy as jnp

    from jinfer.attention import AttentionMetadata
    from jinfer.kv_cache import KVCache
    from tests.model_forward import jit_forward
    from jinfer.models.training import causal_forward
    model = load_hf_model(TEST_MODEL_DIR)
    ids = np.array([Tokenizer.from_dir(TEST_MODEL_DIR).encode("def f(x):\n    return x + 1\n")], np.int32)
    n = ids.shape[1]
    dense = np.asarray(causal_forward(model, jnp.asarray(ids)))[0]
    cache = KVCache.create(model.config, 4, 16)
    md = AttentionMetadata.from_lengths([n], [n], [[2, 0]])
    paged, _ = jit_forward(model)(ids[0], np.arange(n, dtype=np.int32), cache, md, np.arange(n, dtype=np.int32))
    np.testing.assert_allclose(dense, np.asarray(paged), atol=2e-4, rtol=1e-4)


def test_training_tool_end_to_end_at_toy_size(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(sysconfig.get_paths()["stdlib"], "json"), src / "json")
    out = tmp_path / "model"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_default_model.py"), f"--stdlib={src}", f"--out={out}",
         "--vocab_size=320", "--hidden_size=32", "--num_layers=1", "--num_heads=2", "--num_kv_heads=1",
         "--intermediate_size=64", "--seq_len=32", "--batch_size=2", "--steps=4", "--eval_every=2",
         "--eval_blocks=2", "--holdout_percent=40", "--dtype=float32"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out loss" in res.stdout
    tok = Tokenizer.from_dir(str(out))
    assert tok.vocab_size == 320
    ours = _jinfer_greedy(str(out), ["import json"], 6)
    assert ours == _hf_greedy(str(out), [tok.encode("import json")], 6)
    card = (out / "README.md").read_text()
    assert "| 4 |" in card and "--steps=4" in card
