"""Tensor parallelism on fake CPU devices: identical greedy tokens for every tp, clear errors."""

import dataclasses

import jax
import numpy as np
import pytest

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from jinfer.models.config import preset
from jinfer.models.llama import init_model
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import byte_level_tokenizer
from sharding.tp import make_mesh, tp_rules

TOK = byte_level_tokenizer()
# 8 query heads, 2 KV heads (GQA 4): tp 4 and 8 replicate KV heads. Vocab 258 is not a
# multiple of 4 or 8, so the LM head is replicated there and split at tp 2.
CFG = dataclasses.replace(preset("tiny"), vocab_size=TOK.vocab_size, hidden_size=64, num_heads=8,
                          num_kv_heads=2, head_dim=8, intermediate_size=128, num_layers=2)
PROMPTS = [list(range(1, 30)), [7, 8, 9], list(range(1, 20)) + [5]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _run(cfg, tp, **kw):
    mesh = None if tp is None else make_mesh(tp)
    eng = Engine(init_model(cfg, seed=3), TOK, CacheConfig(page_size=4, num_pages=64),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64),
                 mesh=mesh, **kw)
    return eng, [o.token_ids for o in eng.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def single():
    return _run(CFG, None)[1]


# tp=2 splits the 2 KV heads, tp=8 replicates them with one query head per device; tp=4 (the
# same two regimes between them) is in the slow set, and test_kv_heads_split_when_tp_divides_them
# runs tp=4 on a model whose KV heads it splits.
@pytest.mark.parametrize("tp", [1, *(pytest.param(tp, marks=[pytest.mark.multi_device] + [pytest.mark.slow] * (tp == 4))
                                     for tp in (2, 4, 8))])
def test_greedy_tokens_identical_for_every_tp(single, tp):
    eng, tokens = _run(CFG, tp)
    assert tokens == single
    # The state and the KV pool really are split (or replicated where the rules say so).
    q = eng.runner.state["layers"][0]["attn"]["q_proj"].get_value()
    assert q.sharding.mesh.size == tp and q.addressable_shards[0].data.shape[1] == 8 // tp
    k_pages = eng.runner.kv.k[0]
    assert k_pages.addressable_shards[0].data.shape[0] == (2 // tp if tp <= 2 else 2)


@pytest.mark.multi_device
def test_kv_heads_split_when_tp_divides_them():
    cfg = dataclasses.replace(CFG, num_kv_heads=8)
    base = _run(cfg, None)[1]
    eng, tokens = _run(cfg, 4)
    assert tokens == base
    assert eng.runner.kv.k[0].addressable_shards[0].data.shape[0] == 2


@pytest.mark.parametrize("change, tp, message", [
    (dict(num_heads=6, num_kv_heads=2), 4, "tp=4 does not divide num_heads=6"),
    (dict(intermediate_size=100), 8, "tp=8 does not divide intermediate_size=100"),
    (dict(num_kv_heads=4, num_heads=12, intermediate_size=192), 6, "tp=6 and num_kv_heads=4: one must divide the other"),
])
def test_tp_that_does_not_fit_the_model_is_rejected(change, tp, message):
    with pytest.raises(ValueError, match=message):
        tp_rules(dataclasses.replace(CFG, **change), tp)


@pytest.mark.multi_device
def test_mesh_errors():
    with pytest.raises(ValueError, match="tp=16 needs 16 devices, 8 available"):
        make_mesh(16)
    assert len(jax.devices()) == 8 and np.prod(make_mesh(8).devices.shape) == 8


@pytest.mark.multi_device
def test_hf_checkpoint_loads_straight_into_shards(hf_checkpoints):
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer
    from jinfer.loader.hf import load_sharded

    path = hf_checkpoints["llama2_bias"]  # 4 query heads, 4 KV heads, q/k/v biases
    mesh = make_mesh(4)
    model = load_sharded(path, mesh)
    q = model.layers[0].attn.q_proj.get_value()
    assert q.sharding.mesh == mesh and q.addressable_shards[0].data.shape == (64, 1, 16)
    tok = Tokenizer.from_dir(path)
    cfgs = (CacheConfig(page_size=4, num_pages=32), SchedulerConfig(max_num_batched_tokens=16,
                                                                    max_num_seqs=2, max_model_len=48))
    sharded = Engine(model, tok, *cfgs, mesh=mesh).generate(PROMPTS[1:], GREEDY)
    single = Engine(load_hf_model(path), tok, *cfgs).generate(PROMPTS[1:], GREEDY)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in single]


@pytest.mark.multi_device
def test_vocab_parallel_knob(single):
    eng, tokens = _run(CFG, 2, options=EngineOptions(vocab_parallel=False))
    assert tokens == single
    assert eng.runner.state["embed"].get_value().addressable_shards[0].data.shape[0] == CFG.vocab_size


@pytest.mark.slow  # the sharding_strategies notebook (tests/test_notebooks.py) runs the same measurement
def test_bench_tp_smoke():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_tp.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| 2 |" in res.stdout and "replicated / split" in res.stdout


@pytest.mark.multi_device
def test_a_swapped_paused_request_resumes_identically_under_tp(single):
    """tp=2 splits the KV heads: a paused request's pages go to each device's host memory with
    their own sharding (only that device's heads) and come back; it resumes as one run over
    prompt + output + tool tokens would."""
    from scheduler.infercept.policies import SwapAll
    eng, _ = _run(CFG, 2, pause_policy=SwapAll())
    marker = single[0][3]
    eng.add_request(PROMPTS[0], dataclasses.replace(GREEDY, intercept_token_ids=(marker,)), request_id="t")
    eng.add_request(PROMPTS[1], GREEDY, request_id="o")
    outs = []
    while not any(o.paused for o in outs):
        outs += eng.step()
    seg1 = next(o for o in outs if o.paused).token_ids
    eng.step()  # the policy swaps it out
    k = eng.host_kv.held("t").k[0]
    assert k.sharding.memory_kind == "pinned_host" and k.addressable_shards[0].data.shape[0] == 1  # one KV head each
    eng.resume("t", [11, 12, 13])
    while eng.has_unfinished():
        outs += eng.step()
    got = next(o for o in outs if o.request_id == "t" and o.finished).token_ids
    want = eng.generate([PROMPTS[0] + seg1 + [11, 12, 13]], GREEDY)[0].token_ids
    assert got == want and eng.host_kv.swapped_in == eng.host_kv.swapped_out > 0
