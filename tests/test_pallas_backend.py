"""The engine on the "pallas" backend (interpreted kernels on CPU) against the "xla" backend."""

import pytest

import jinfer.attention.pallas as pallas_backend
from jinfer.attention import default_attention_backend
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.config import EngineOptions
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer


def _tokens(path, backend, prompts):
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=48),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64),
                 options=EngineOptions(attention_backend=backend))
    assert eng.attention_backend == backend
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("variant", ["llama3", "mistral"])  # GQA 4; sliding window 8 with GQA 2
def test_engine_greedy_tokens_identical_across_backends(hf_checkpoints, variant, monkeypatch):
    # A chunked 40-token prompt (budget 32), a short one and one sharing its prefix: mixed steps
    # go to the ragged kernel, the decode-only steps at the end to the split-K decode kernel.
    traced = []
    for name in ("ragged_paged_attention", "decode_paged_attention"):
        kernel = getattr(pallas_backend, name)
        monkeypatch.setattr(pallas_backend, name,
                            lambda *a, _k=kernel, _n=name, **kw: traced.append(_n) or _k(*a, **kw))
    prompts = [list(range(3, 43)), [5, 6, 7], list(range(3, 23)) + [9, 9]]
    path = hf_checkpoints[variant]
    assert _tokens(path, "pallas", prompts) == _tokens(path, "xla", prompts)
    assert {"ragged_paged_attention", "decode_paged_attention"} <= set(traced)


def test_default_backend_is_xla_on_cpu_and_unknown_names_fail(hf_checkpoints):
    assert default_attention_backend() == "xla"
    path = hf_checkpoints["llama3"]
    with pytest.raises(ValueError, match=r"unknown attention_backend='triton'; known: \['pallas', 'xla'\]"):
        Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=8),
               SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=32),
               options=EngineOptions(attention_backend="triton"))


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
