"""Runner buckets and ahead-of-time warm-up."""

import numpy as np

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.runner import buckets, pick_bucket
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer


def test_buckets_are_powers_of_two_capped_by_the_limit():
    assert buckets(48, smallest=16) == (16, 32, 48)
    assert buckets(1) == (1,)
    assert pick_bucket(17, (16, 32, 48)) == 32


def test_warmup_compiles_every_bucket_and_steps_reuse_them(hf_checkpoints):
    path = hf_checkpoints["llama3"]
    eng = Engine(load_hf_model(path), Tokenizer.from_dir(path), CacheConfig(page_size=4, num_pages=32),
                 SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=48), warmup=True)
    runner = eng.runner
    assert set(runner._compiled) == {(16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4)}
    traces = runner._step._cache_size()
    out = eng.generate([[1, 2, 3], list(range(20))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [6, 6]
    assert runner._step._cache_size() == traces, "a step retraced instead of using a warm bucket"
    assert np.isfinite(np.asarray(runner.kv.k[0][:, :4])).all()
