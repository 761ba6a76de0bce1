"""Greedy generation through the engine against HF generate, and tools/generate.py end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = f"--config={os.path.join(ROOT, 'configs', 'test_5m.py')}"  # the 5.1M test model, not the default


# llama3's greedy tokens against HF generate run in the default set in tests/test_engine.py (a
# ragged batch at several budgets, prefix cache on and off); here only in the slow set.
@pytest.mark.parametrize("variant", [pytest.param("llama3", marks=pytest.mark.slow), "qwen2"])
def test_greedy_tokens_match_hf_generate(hf_checkpoints, variant):
    path = hf_checkpoints[variant]
    prompts = [np.random.default_rng(s).integers(0, 256, n).tolist() for s, n in [(0, 9), (1, 3), (2, 17)]]
    engine = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                    SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64))
    ours = [o.token_ids for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                        ignore_eos=True))]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want


def test_greedy_rejects_bad_input(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    engine = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                    SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([[1], []], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(temperature=0, max_tokens=0)
    with pytest.raises(ValueError, match="exceeds max_model_len=64"):
        engine.generate([[1] * 60], SamplingParams(temperature=0, max_tokens=10))


def _run_generate(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_generate_tool_json_output(hf_checkpoints, tmp_path):
    (tmp_path / "prompts.txt").write_text("ab\n\nc d\n")
    res = _run_generate(f"--config.model.path={hf_checkpoints['mistral']}", "--prompt=def f(x):",
                        f"--prompts_file={tmp_path / 'prompts.txt'}", "--max_tokens=5", "--json",
                        "--temperature=0.7", "--top_k=20", "--seed=3", "--config.scheduler.max_model_len=64",
                        "--config.cache.num_pages=64", "--n=2")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["prompt"], r["index"]) for r in rows] == [
        ("def f(x):", 0), ("def f(x):", 1), ("ab", 0), ("ab", 1), ("c d", 0), ("c d", 1)]
    for r in rows:
        assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length" and isinstance(r["text"], str)


def test_generate_tool_test_model_and_errors(tmp_path):
    cpus = {**os.environ, "JAX_PLATFORMS": "cpu",  # the 8 fake devices, also on a one-GPU machine
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    res = _run_generate(TEST_CONFIG, "--prompt=hello", "--max_tokens=3", "--json", env=cpus)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["token_ids"]) == 3
    sharded = _run_generate(TEST_CONFIG, "--prompt=hello", "--max_tokens=3", "--json", "--config.model.tp=2", env=cpus)
    assert sharded.returncode == 0, sharded.stderr
    assert json.loads(sharded.stdout)["token_ids"] == json.loads(res.stdout)["token_ids"]
    res = _run_generate(TEST_CONFIG, "--prompt=x", "--config.model.tp=16", env=cpus)
    assert res.returncode != 0 and "tp=16 needs 16 devices, 8 available" in res.stderr
    res = _run_generate(f"--config.model.path={tmp_path}/nope", "--prompt=x")
    assert res.returncode != 0 and "does not exist" in res.stderr
    res = _run_generate(TEST_CONFIG)
    assert res.returncode != 0 and "give at least one --prompt" in res.stderr
    res = _run_generate(TEST_CONFIG, "--prompt=x", "--top_p=1.5")
    assert res.returncode != 0 and "top_p=1.5 must be in (0, 1]" in res.stderr
    res = _run_generate(TEST_CONFIG, "--prompt=x", "--config.cache.page_sise=8")  # a typo in a config field
    assert res.returncode != 0 and "page_sise" in res.stderr and "Traceback" not in res.stderr
