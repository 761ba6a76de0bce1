"""The RL loop's math tasks (harness/rl_tasks.py) and a trainer that updates only the last layers
(harness.rl.PolicyTrainer(train_layers=)): seeded questions with checkable answers, a reward that
reads the last number, rollouts over the chat template, and an update that leaves every other
weight as it was."""

import jax
import numpy as np
import pytest
from flax import nnx

from harness import rl, rl_tasks
from jinfer import TEST_MODEL_DIR
from jinfer.config import CacheConfig, SchedulerConfig
from jinfer.engine import Engine
from jinfer.loader.hf import load_hf_model
from jinfer.tokenizer import Tokenizer


def test_math_tasks_are_seeded_and_their_answers_are_right():
    tasks = rl_tasks.math_tasks(8, seed=3)
    assert tasks == rl_tasks.math_tasks(8, seed=3) and tasks != rl_tasks.math_tasks(8, seed=4)
    ops = (lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a * b)
    for i, task in enumerate(tasks):  # the question's numbers give the answer by its template's operation
        a, b = (int(x) for x in rl_tasks._NUMBER.findall(task.question)[:2])
        assert task.answer == ops[i % 4](a, b), task
    with pytest.raises(ValueError, match="n=-1"):
        rl_tasks.math_tasks(-1)


def test_the_math_reward_reads_the_last_number():
    task = rl_tasks.MathTask("q", 1234)
    assert task.reward("5 + 7 = 12, and 1,234 in all: 1234") == 1.0
    assert task.reward("The answer is 1,234.") == 1.0
    assert task.reward("1234 is not it: 1233") == 0.0
    assert task.reward("no number at all") == 0.0
    assert rl_tasks.MathTask("q", -3).reward("it drops to -3") == 1.0
    assert task.reward("1234.5") == 0.0 and rl_tasks.MathTask("q", 3).reward("1,2,3") == 1.0


@pytest.fixture(scope="module")
def model():
    return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)


def test_math_rollouts_go_through_the_chat_template_and_are_scored(model):
    m, tok = model
    tok = Tokenizer.from_dir(TEST_MODEL_DIR)
    tok.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    task = rl_tasks.math_tasks(1)[0]
    assert task.prompt_ids(tok) == tuple(tok.encode(f"Q: {task.question}\nA:", add_special_tokens=False))
    engine = Engine(m, tok, CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=256))
    rollouts, _ = rl.collect_rollouts(engine, tok, [task, "def add(a, b):"], group_size=2, epoch=0, max_tokens=8)
    assert [(r.problem, r.sample) for r in rollouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rollouts[0].prompt_ids == task.prompt_ids(tok)
    assert all(r.reward == task.reward(r.text) for r in rollouts[:2])
    assert all(r.reward == rl.reward("def add(a, b):", r.text) for r in rollouts[2:])
    assert task.stop == ()  # (a math answer runs to EOS or max_tokens; code stops at STOP)


def test_a_trainer_of_the_last_layers_moves_only_them(model):
    m, tok = model
    engine = Engine(m, tok, CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256))
    with pytest.raises(ValueError, match="train_layers=0"):
        rl.PolicyTrainer(m, train_layers=0)
    trainer = rl.PolicyTrainer(m, learning_rate=1e-2, train_layers=1)
    before = nnx.to_flat_state(nnx.split(m)[1])
    rollouts, _ = rl.collect_rollouts(engine, tok, rl.PROBLEMS[:2], group_size=4, epoch=0, max_tokens=16, seed=1)
    assert any(len({r.reward for r in rollouts if r.problem == p}) > 1 for p in (0, 1))  # an advantage != 0
    trainer.step(rollouts)
    after = dict(nnx.to_flat_state(trainer.state()))
    last = len(m.layers) - 1
    moved = {path for path, v in before
             if not np.array_equal(np.asarray(v.get_value()), np.asarray(after[path].get_value()))}
    assert all(p[0] == "final_norm" or (p[0] == "layers" and int(p[1]) == last) for p in moved)
    assert {p[0] for p in moved} == {"final_norm", "layers"}  # both trained, nothing else
    engine.update_weights(trainer.state())  # the whole state, as an engine takes it (else ValueError)
