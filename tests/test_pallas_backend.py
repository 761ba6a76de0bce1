"""The engine on the "pallas" backend (interpreted kernels on CPU) against the "xla" backend;
a draft-tree step through both backends, also under tensor parallelism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention import AttentionMetadata, PallasBackend, XlaBackend, default_attention_backend
import jinfer.attention.pallas as pallas_backend
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.config import EngineOptions
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.runner import ModelRunner
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer


def _tokens(path, backend, prompts):
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=48),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64),
                 options=EngineOptions(attention_backend=backend))
    assert eng.attention_backend == backend
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("variant, backend", [("llama3", "pallas_split"),  # GQA 4
                                              ("mistral", "pallas")])  # sliding window 8, GQA 2
def test_engine_greedy_tokens_identical_across_backends(hf_checkpoints, variant, backend, monkeypatch):
    # A short prompt, a chunked 40-token one (budget 32) and one sharing its prefix: the second
    # step holds the short one's first decode beside prompt chunks, so mixed steps with a
    # one-token row go to the ragged kernel (pallas_split: that row to the split-K decode kernel,
    # through mixed_paged_attention), the decode-only steps at the end to the decode kernel.
    traced, mixed_steps = [], []
    mixed = "mixed_paged_attention" if backend == "pallas_split" else "ragged_paged_attention"
    for name in (mixed, "decode_paged_attention"):
        kernel = getattr(pallas_backend, name)
        monkeypatch.setattr(pallas_backend, name,
                            lambda *a, _k=kernel, _n=name, **kw: traced.append(_n) or _k(*a, **kw))
    prompts = [[5, 6, 7], list(range(3, 43)), list(range(3, 23)) + [9, 9]]
    path = hf_checkpoints[variant]
    dispatch = ModelRunner.dispatch

    def spy(runner, plan):
        lens = [len(seq.token_ids) for seq in plan.seqs]
        mixed_steps.append(1 in lens and max(lens) > 1)
        return dispatch(runner, plan)
    monkeypatch.setattr(ModelRunner, "dispatch", spy)
    assert _tokens(path, backend, prompts) == _tokens(path, "xla", prompts)
    assert {mixed, "decode_paged_attention"} <= set(traced)
    assert any(mixed_steps)  # a one-token row beside a prompt chunk in one step


def test_default_backend_is_xla_on_cpu_and_unknown_names_fail(hf_checkpoints):
    assert default_attention_backend() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    path = hf_checkpoints["llama3"]
    known = r"\['pallas', 'pallas_split', 'xla'\]"
    with pytest.raises(ValueError, match=rf"unknown attention_backend='triton'; known: {known}"):
        Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=8),
               SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=32),
               options=EngineOptions(attention_backend="triton"))


@pytest.mark.multi_device
@pytest.mark.parametrize("variant, tp", [("llama2_bias", 2),  # 4 KV heads split 2 per device
                                         ("llama3", 4)])  # 1 KV head kept whole on all 4 devices
def test_pallas_under_tensor_parallelism_matches_one_device(hf_checkpoints, variant, tp):
    from sharding.tp import make_mesh
    path = hf_checkpoints[variant]
    prompts = [list(range(3, 15)), [5, 6, 7]]  # a chunked prompt, then decode-only steps

    def tokens(backend, mesh):
        eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=16),
                     SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=2, max_model_len=24),
                     options=EngineOptions(attention_backend=backend), mesh=mesh)
        outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        return eng, [o.token_ids for o in outs]

    eng, sharded = tokens("pallas", make_mesh(tp))
    assert sharded == tokens("xla", None)[1]
    assert eng.runner.kv.k[0].sharding.mesh.size == tp


def _tree_step(rng, *, num_heads=8, num_kv_heads=2, head_dim=16, page=4):
    """One step of draft trees mixed with a decode and a prefill chunk: (q, k, v, k_pages,
    v_pages, md) with cached slots filled and every other slot NaN."""
    q_lens, kv_lens = [5, 1, 12, 7], [9, 7, 12, 7]
    parents = [[-1, 0, 0, 1, 1], None, None, [-1, 0, 1, 1, 0, 4, -1]]
    pages_per_seq = 4
    perm = rng.permutation(len(q_lens) * pages_per_seq)
    tables = [perm[i * pages_per_seq:(i + 1) * pages_per_seq].tolist() for i in range(len(q_lens))]
    num_tokens = sum(q_lens) + 3
    md = AttentionMetadata.from_lengths(q_lens, kv_lens, tables, max_seqs=5, parents=parents,
                                        num_tokens=num_tokens)
    shape = (num_kv_heads, len(perm), page, head_dim)
    k_pages, v_pages = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    for table, q_len, kv_len in zip(tables, q_lens, kv_lens):
        for pos in range(kv_len - q_len):
            k_pages[:, table[pos // page], pos % page] = rng.normal(size=(num_kv_heads, head_dim))
            v_pages[:, table[pos // page], pos % page] = rng.normal(size=(num_kv_heads, head_dim))
    q = rng.normal(size=(num_tokens, num_heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(num_tokens, num_kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return tuple(map(jnp.asarray, (q, k, v, k_pages, v_pages))) + (md,)


@pytest.mark.multi_device
@pytest.mark.parametrize("tp", [2, 4])  # 2 KV heads split one per device; kept whole on 4 devices
def test_pallas_tree_step_under_tensor_parallelism_matches_xla(tp):
    from sharding.tp import make_mesh
    q, k, v, kp, vp, md = _tree_step(np.random.default_rng(tp))
    kw = dict(sm_scale=0.25, sliding_window=None)
    want = XlaBackend()(q, k, v, kp, vp, md, **kw)
    with jax.set_mesh(make_mesh(tp)):
        got = jax.jit(lambda *a: PallasBackend()(*a, **kw))(q, k, v, kp, vp, md)
    real = int(md.cu_q_lens[-1])
    np.testing.assert_allclose(np.asarray(got[0])[:real], np.asarray(want[0])[:real], atol=2e-5, rtol=2e-5)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pallas_tree_step_never_takes_the_decode_kernel(monkeypatch):
    """A step of one-token trees marked decode_only still goes to the ragged kernel."""
    monkeypatch.setattr(pallas_backend, "decode_paged_attention",
                        lambda *a, **kw: pytest.fail("a tree step reached the decode kernel"))
    q, k, v = (jnp.ones((2, h, 16)) for h in (4, 2, 2))
    kp = vp = jnp.zeros((2, 3, 4, 16))
    one = AttentionMetadata.from_lengths([1, 1], [3, 5], [[0], [1, 2]], parents=[[-1], [-1]])
    md = dataclasses.replace(one, decode_only=True)
    out = PallasBackend()(q, k, v, kp, vp, md, sm_scale=0.25, sliding_window=None)
    assert np.isfinite(np.asarray(out[0])).all()
