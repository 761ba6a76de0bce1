"""On-policy RL over the engine (harness.rl) and Engine.update_weights: new weights serve as a
fresh engine built on them would, without recompiling and with no stale prefix cache; a wrong
state is refused whole; RL epochs with speculative decoding and without produce bit-identical
rollouts, rewards and losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harness import rl
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.programs import ProgramStore
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer import Tokenizer
from scheduler.speculation.drafters import SuffixDrafter

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)


# The epochs' engines share their compiled steps. The weight-update tests' engines keep their
# own (jit's cache, which tells weights placed otherwise apart: a new program would be traced).
PROGRAMS = ProgramStore()


def _engine(model, **kw):
    m, tok = model
    return Engine(m, tok, CacheConfig(page_size=16, num_pages=128),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16, max_model_len=256), **kw)


@pytest.fixture(scope="module")
def engine(model):
    return _engine(model)


def _greedy(engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


def _perturbed(state, scale=0.3):
    """Every weight times (1 + scale x noise), committed to device 0 (the engine's own are not)."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noisy = [jax.device_put(x * (1 + scale * jax.random.normal(k, x.shape, x.dtype)), jax.devices()[0])
             for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def _replace_leaf(state, name, fn):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: fn(x) if jax.tree_util.keystr(path, simple=True, separator="/") == name else x, state)


def test_new_weights_serve_as_a_fresh_engine_would_without_recompiling(model, engine):
    engine.reset_prefix_cache()  # the run below then has the shapes of the run after the update
    old = engine.runner.state
    before = _greedy(engine)
    assert engine.load().cached_pages > 0
    programs, compiled = engine.runner.traced_steps(), engine.runner.compiled_buckets()
    new = _perturbed(old)

    engine.update_weights(new)
    assert engine.load().cached_pages == 0  # its K/V came from the old weights
    after = _greedy(engine)
    assert after != before
    fresh = _engine((nnx.merge(nnx.split(model[0])[0], new), model[1]))
    assert _greedy(fresh) == after
    assert engine.runner.traced_steps() == programs and engine.runner.compiled_buckets() == compiled

    engine.update_weights(old)
    assert _greedy(engine) == before
    assert engine.runner.traced_steps() == programs


def test_an_update_between_steps_settles_the_step_in_flight_first(engine):
    expected = _greedy(engine)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=f"mid{i}")
    assert engine.step() == [] and engine.step_in_flight  # its tokens are read next step()
    engine.update_weights(jax.tree.map(jnp.copy, engine.runner.state))  # the same weights, new arrays
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [final["mid0"], final["mid1"]] == expected


def test_a_mismatched_state_is_refused_and_the_old_weights_keep_serving(engine):
    old = engine.runner.state
    before = _greedy(engine)
    narrow = _replace_leaf(old, "layers/1/attn/q_proj/value", lambda x: x[:, :-1])
    with pytest.raises(ValueError, match=r"leaf layers/1/attn/q_proj/value has shape \(256, 7, 32\) and dtype "
                                         r"float32, expected \(256, 8, 32\) and float32"):
        engine.update_weights(narrow)
    half = _replace_leaf(old, "embed/value", lambda x: x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"leaf embed/value has shape \(4096, 256\) and dtype bfloat16, "
                                         r"expected \(4096, 256\) and float32"):
        engine.update_weights(half)
    with pytest.raises(ValueError, match="leaf embed where the engine's weights have embed/value"):
        engine.update_weights({"embed": old["embed"].get_value()})
    with pytest.raises(ValueError, match="leaf final_norm/scale/value is missing from the given state"):
        engine.update_weights({"embed": old["embed"]})
    assert engine.runner.state is old
    assert _greedy(engine) == before


def test_reward_is_one_when_the_code_compiles_and_never_raises():
    assert rl.reward("def f(n):", "\n    return n + 1\n") == 1.0
    assert rl.reward("def f(n):\n    return (n", " + 1)") == 1.0
    # what follows the body at column 0 is not scored
    assert rl.reward("def f(n):", "\n    return n\n\nthis is not Python (") == 1.0
    # 2 of the 3 lines from the prompt's last on compile: partial credit 0.5 x 2 / 3
    assert rl.reward("def f(n):", "\n    x = 1\n    y = (") == pytest.approx(1 / 3)
    assert rl.reward("def f(n):", "\nreturn 1") == 0.0  # no body
    assert all(rl.reward(p, "") == 0.0 for p in rl.PROBLEMS)  # no problem compiles alone
    assert len(rl.PROBLEMS) >= 32 and len(set(rl.PROBLEMS)) == len(rl.PROBLEMS)
    garbage = ["\x00", "\ud800", "\n    '''", "(" * 5000, "\n    x = '\\d'", "\n\t  \t" * 50, "\n    " + "[" * 300,
               "\n    return 1" * 500 + "\n    (", "é" * 100]
    for text in garbage:
        score = rl.reward("def f(n):", text)
        assert 0.0 <= score <= 1.0 and score == rl.reward("def f(n):", text)


def test_grpo_advantages_normalise_within_each_group():
    adv = rl.grpo_advantages([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 3, 1, 2, 2], group_size=4)
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, [1, -1, -1, 1, 0, 0, 0, 0, 2 ** 0.5, -2 ** 0.5, 0, 0], atol=1e-4)
    assert (adv[4:8] == 0).all()
    with pytest.raises(ValueError, match="group_size=4"):
        rl.grpo_advantages([1, 2, 3], group_size=4)


def test_the_training_batch_masks_exactly_the_completion_tokens():
    rollouts = [rl.Rollout(0, 0, (1, 5, 6), (7, 8), "", 0.0, "stop"),
                rl.Rollout(0, 1, (1, 5, 6), tuple(range(10, 80)), "", 1.0, "length")]
    ids, mask = rl.training_batch(rollouts, length_bucket=64)
    assert ids.shape == (2, 128) and mask.shape == (2, 127)
    assert ids[0, :5].tolist() == [1, 5, 6, 7, 8] and not ids[0, 5:].any()
    # position t predicts token t + 1: the completion's tokens are predicted from positions 2, 3, ...
    assert np.flatnonzero(mask[0]).tolist() == [2, 3]
    assert mask[1].sum() == 70 and np.flatnonzero(mask[1])[[0, -1]].tolist() == [2, 71]


def test_rl_epochs_with_and_without_speculation_are_bit_identical(model):
    m, tok = model
    initial = jax.tree.leaves(nnx.split(m)[1])

    def run(drafter):
        engine = _engine(model, drafter=drafter, max_spec_tokens=4, programs=PROGRAMS)
        trainer = rl.PolicyTrainer(m, learning_rate=1e-4)
        rollouts = []
        records = rl.run_epochs(engine, tok, trainer, rl.PROBLEMS[:4], epochs=2, group_size=4, max_tokens=32,
                                seed=7, on_epoch=lambda record, rs: rollouts.append(rs))
        return records, rollouts, engine

    plain, plain_rollouts, plain_engine = run(None)
    spec, spec_rollouts, _ = run(SuffixDrafter())
    for epoch in range(2):  # the second epoch runs on the weights the first one trained
        assert [r.token_ids for r in spec_rollouts[epoch]] == [r.token_ids for r in plain_rollouts[epoch]]
        assert [r.reward for r in spec_rollouts[epoch]] == [r.reward for r in plain_rollouts[epoch]]
        assert spec[epoch]["loss"] == plain[epoch]["loss"]
        assert spec[epoch]["lengths"] == plain[epoch]["lengths"]
    assert sum(r["accepted_tokens"] for r in spec) > 0
    assert all(r["draft_tokens"] == 0 for r in plain)
    # the policy did move: the weights the engine serves are no longer the initial ones
    assert any(r["loss"] != 0 for r in plain)
    served = jax.tree.leaves(plain_engine.runner.state)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, served))
