"""Sampling filters, seeded reproducibility across batches, stop strings and UTF-8 streaming."""

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.detokenizer import IncrementalDetokenizer
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.sampling import SamplingArrays, first_argmax, token_logprobs
from jinfer.sampling import sample as _sample_eager
from jinfer.sampling_params import SamplingParams
from jinfer.step_plan import ScheduledSeq
from jinfer.tokenizer import Tokenizer, byte_level_tokenizer


sample = jax.jit(_sample_eager)


def _arrays(params_list, seeds, index=0):
    seqs = [ScheduledSeq("r", (0,), 0, (), True, p, s, 0, index) for p, s in zip(params_list, seeds)]
    return SamplingArrays.from_seqs(seqs, len(seqs))


def _draw(logits, params, n=200):
    """n samples of one row of logits under params, each with a different seed."""
    logits = np.tile(logits, (n, 1)).astype(np.float32)
    ids, _ = sample(logits, _arrays([params] * n, range(n)))
    return set(np.asarray(ids).tolist())


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]))


def test_top_k_only_emits_the_k_most_likely():
    assert _draw(LOGITS, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


def test_top_p_only_emits_the_nucleus():
    # 0.4 + 0.25 = 0.65 < 0.7, so token 2 is needed to reach 0.7; token 3 never is.
    assert _draw(LOGITS, SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1, 2}


@pytest.mark.parametrize("top_p", [1e-39, 1e-45, 1e-300])
def test_a_top_p_that_underflows_float32_keeps_the_most_likely_token(top_p):
    # The argmax is not token 0, so "nothing kept" (which returned token 0) cannot pass.
    logits = LOGITS[::-1].copy()
    assert _draw(logits, SamplingParams(temperature=1.0, top_p=top_p)) == {6}
    # HF's top-p warper keeps the same single token.
    kept = TopPLogitsWarper(top_p)(None, torch.tensor(logits[None], dtype=torch.float32))
    assert set(np.flatnonzero(np.isfinite(kept.numpy()[0]))) == {6}


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 2**31, "top_k=2147483648 must be < 2**31"),
    ("temperature", 1e300, "temperature=1e+300 must be finite and >= 0, at most 3.403e+38"),
    ("temperature", float("nan"), "temperature=nan"),
    ("seed", 2**31, "seed=2147483648"),
    ("n", 2**40, "n=1099511627776"),
    ("max_tokens", 2**31, "max_tokens=2147483648"),
    ("top_k", 1.5, "top_k=1.5 must be an integer"),
    ("temperature", "1", "temperature='1' must be a number"),
    ("stop_token_ids", (5, 2**31), "stop_token_ids[1]=2147483648"),
    ("stop", "ab", "stop='ab' must be a sequence of strings"),
    ("stop", (b"x",), "stop=(b'x',) must be a sequence of strings"),
    ("temperature", 10**400, "temperature=1000"),
    ("stop_token_ids", 5, "stop_token_ids=5 must be a sequence of token ids"),
])
def test_values_the_step_cannot_hold_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert str(e.value).startswith(message) or message in str(e.value)


def test_numpy_numbers_are_taken_as_python_ones():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4),
                       stop_token_ids=(np.int64(7),))
    assert (type(p.temperature), type(p.top_k), type(p.max_tokens), type(p.stop_token_ids[0])) == (float, int, int, int)


def test_min_p_drops_tokens_below_the_threshold():
    # min_p=0.3 -> keep p >= 0.12: tokens 0, 1, 2.
    assert _draw(LOGITS, SamplingParams(temperature=1.0, min_p=0.3)) == {0, 1, 2}


def test_unfiltered_sampling_reaches_the_tail_and_greedy_is_argmax():
    assert len(_draw(LOGITS, SamplingParams(temperature=1.0), n=400)) >= 6
    assert _draw(LOGITS, SamplingParams(temperature=0.0)) == {0}


def test_sampled_frequencies_follow_the_distribution():
    logits = np.tile(LOGITS, (4000, 1)).astype(np.float32)
    ids, _ = sample(logits, _arrays([SamplingParams(temperature=1.0)] * 4000, range(4000)))
    freq = np.bincount(np.asarray(ids), minlength=7) / 4000
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)


def test_a_row_samples_the_same_whether_or_not_its_batch_needs_sorting():
    """Batch-mates with top-p/top-k switch sample() to its sorted path; other rows must not notice."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    plain = SamplingParams(temperature=0.9, min_p=0.01)
    alone = [sample(logits[:1], _arrays([plain], [s]))[0][0] for s in range(20)]
    mixed = [sample(logits, _arrays([plain, SamplingParams(temperature=1.0, top_p=0.5),
                                     SamplingParams(temperature=0)], [s, 1, 2]))[0][0] for s in range(20)]
    assert [int(a) for a in alone] == [int(m) for m in mixed]
    assert len({int(a) for a in alone}) > 1  # really random across seeds


def test_logprobs_are_of_the_model_distribution():
    ids, logprobs = sample(LOGITS[None].astype(np.float32), _arrays([SamplingParams(temperature=0)], [0]))
    assert int(ids[0]) == 0 and abs(float(logprobs[0]) - np.log(0.4)) < 1e-5


def test_greedy_ids_and_logprobs_match_argmax_and_log_softmax_in_torch_and_jax():
    """The greedy path's own reductions (sampling.first_argmax, token_logprobs) against
    jnp.argmax / jax.nn.log_softmax and torch's argmax / log_softmax (what HF's greedy search
    and output scores use), on a real-size vocabulary with ties, NaN and infinite rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 49152)).astype(np.float32)
    x[1, [7, 300]] = x[1].max() + 1  # a tie: the first index wins
    x[2, 11] = np.inf
    x[3, [5, 9]] = np.nan  # argmax's rule: the first NaN
    x[4] = -np.inf
    x[5, :] = 0.0
    ids = np.asarray(jax.jit(first_argmax)(x))
    np.testing.assert_array_equal(ids, np.asarray(jax.numpy.argmax(x, axis=-1)))
    assert ids[1] == 7 and ids[2] == 11 and ids[3] == 5 and ids[5] == 0
    finite = np.isfinite(x).all(axis=1)
    np.testing.assert_array_equal(ids[finite], torch.from_numpy(x[finite]).argmax(-1).numpy())
    picked = rng.integers(0, x.shape[1], x.shape[0]).astype(np.int32)
    got = np.asarray(jax.jit(token_logprobs)(x[finite], picked[finite]))
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(x[finite], axis=-1)), picked[finite, None], -1)[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    torch_lp = torch.log_softmax(torch.from_numpy(x[finite]), -1).numpy()
    np.testing.assert_allclose(got, np.take_along_axis(torch_lp, picked[finite, None], -1)[:, 0], atol=1e-5)


@pytest.fixture(scope="module")
def engine_parts(hf_checkpoints):
    path = hf_checkpoints["qwen2"]
    return load_hf_model(path), Tokenizer.from_dir(path)


def _engine(parts):
    return Engine(*parts, CacheConfig(page_size=4, num_pages=64),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64))


def test_same_seed_same_tokens_regardless_of_batch(engine_parts):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _engine(engine_parts).generate([[5, 6, 7]], params)[0].token_ids
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2)]
    batched = _engine(engine_parts).generate([[9, 9, 9, 9, 9], [5, 6, 7], [1]],
                                             [others[0], params, others[1]])
    assert batched[1].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True)
    assert _engine(engine_parts).generate([[5, 6, 7]], unseeded)[0].token_ids != alone


def test_stop_string_cuts_text_and_finishes(engine_parts):
    eng = _engine(engine_parts)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = eng.generate(["ab"], greedy)[0]
    stop = full.text[3:5]
    assert len(stop) == 2 and stop not in full.text[:4]
    out = eng.generate(["ab"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]
    assert full.text.startswith(out.text) and len(out.token_ids) < 12


def test_stop_token_id_finishes(engine_parts):
    eng = _engine(engine_parts)
    full = eng.generate([[3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    out = eng.generate([[3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                stop_token_ids=(full.token_ids[2],)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[2]) + 1]


def test_detokenizer_streams_multibyte_utf8_without_garbage():
    tok = byte_level_tokenizer()
    text = "héllo, 世界 🙂!"
    ids = tok.encode(text, add_bos=False)  # byte tokens: multi-byte chars span several
    detok = IncrementalDetokenizer(tok, [tok.bos_id])
    pieces = []
    for t in ids:
        detok.append(t)
        pieces.append(detok.delta(finished=False))
    detok.flush()
    pieces.append(detok.delta(finished=True))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_detokenizer_holds_back_possible_stop_prefix():
    tok = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tok, [tok.bos_id], stop=("END",))
    emitted = ""
    for ch in "abcEN":
        detok.append(tok.encode(ch, add_bos=False)[0])
        assert not detok.find_stop()
        emitted += detok.delta(finished=False)
    assert emitted == "abc"  # "EN" may begin "END": held back
    detok.append(tok.encode("D", add_bos=False)[0])
    assert detok.find_stop() and emitted + detok.delta(finished=True) == "abc"
