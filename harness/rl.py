"""A small on-policy RL loop over the engine (GRPO-style): sample a group of completions per
problem, score each with a verifiable reward (a code prompt: does the code compile; a math word
problem, harness/rl_tasks.py: is the answer right), take one policy-gradient step on
group-normalised advantages (of every weight, or of the last layers only), and swap the new
weights into the running engine (Engine.update_weights) for the next epoch.

Every sample carries its own seed, a function of (seed, epoch, problem, sample): the same
weights give the same tokens whatever else is in the batch, and speculative decoding is
lossless, so a run with a drafter and one without produce the same rollouts, losses and
weights epoch after epoch; only the time differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jinfer.models.training import causal_forward
from jinfer.sampling_params import SamplingParams

# Python prompts for the test model (trained on the standard library's source). None
# compiles alone; those that leave one expression open tend to close in a few tokens, class
# and block bodies run long.
PROBLEMS: tuple[str, ...] = (
    "def fibonacci(n):",
    "def is_even(n):\n    return (n",
    "class Stack:\n    def __init__(self):",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "def add(a, b):",
    "def main():",
    "def _get_name(self):",
    "def read_file(path):\n    with open(path) as f:",
    "def __len__(self):",
    "def __repr__(self):\n    return '<%s %r>' % (",
    "def clamp(value, low, high):\n    if value < low:",
    "class Point:\n    def __init__(self, x, y):",
    "def flatten(items):\n    result = []\n    for item in items:",
    "def copy_file(src, dst):\n    try:",
    "def count_words(text):\n    counts = {}\n    for word in",
    "def join_path(*parts):\n    return os.path.join(",
    "def is_empty(self):\n    return not",
    "def __eq__(self, other):\n    if not isinstance(other,",
    "def close(self):\n    if self._file is not None:",
    "class Error(Exception):",
    "def get(self, key, default=None):\n    try:",
    "def __iter__(self):\n    for item in",
    "def quote(s):\n    return '\"' + s.replace(",
    "def max_value(values):\n    best = None\n    for v in values:",
    "def split_lines(text):\n    return [line for line in",
    "def to_bytes(s, encoding='utf-8'):\n    if isinstance(s,",
    "def _check_name(name):\n    if not name:",
    "def format_size(n):\n    for unit in",
    "class Config:\n    def __init__(self, **kwargs):",
    "def run(cmd):\n    proc = subprocess.Popen(",
    "def reverse(seq):\n    return seq[",
    "def __contains__(self, key):\n    return key in",
)

# A completion ends where top-level code starts again (the function or class is over).
STOP: tuple[str, ...] = ("\ndef ", "\nclass ", "\n@", "\nif __name__", "\nimport ", "\nfrom ", "\n#", "\n\n\n")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One sampled completion of one problem, scored."""

    problem: int  # index into the problems
    sample: int  # index within the problem's group
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # the completion's tokens, as sampled (stop string and EOS included)
    text: str  # the completion's text (cut before a stop string)
    reward: float
    finish_reason: str


# -- reward ----------------------------------------------------------------------------------


def reward(prompt: str, completion: str) -> float:
    """1.0 if prompt + completion compiles as Python, else a partial credit below 0.5.

    The program is cut at the first line back at column 0 after an indented line (what follows
    the function or class body is not scored). Partial credit: 0.5 x k / n, where n counts the
    program's lines from the prompt's last line on (the lines the completion writes into) and
    k < n is the most of them that compile together with the lines before them: a broken
    program scores by how far it stays valid. Deterministic; never raises.
    """
    try:
        lines = _cut(prompt + completion).split("\n")
        if _compiles(lines):
            return 1.0
        head = prompt.count("\n")
        n = len(lines) - head
        k = next((k for k in range(n - 1, 0, -1) if _compiles(lines[:head + k])), 0)
        return 0.5 * k / n
    except Exception:  # a reward must score anything a model writes
        return 0.0


def _cut(program: str) -> str:
    """program up to the first non-blank line at column 0 that follows an indented line."""
    lines = program.split("\n")
    indented = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if line[0] in " \t":
            indented = True
        elif indented:
            return "\n".join(lines[:i])
    return program


def _compiles(lines: list[str]) -> bool:
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning on an invalid escape
            warnings.simplefilter("ignore")
            compile("\n".join(lines), "<rollout>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False


# -- rollouts --------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, problem: int, sample: int) -> int:
    """The sampling seed of one rollout, in [0, 2**31): a hash of all four, so seeds of nearby
    epochs, problems and samples do not overlap as seed + offset arithmetic would."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{problem}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def collect_rollouts(engine, tokenizer, problems: Sequence, *, group_size: int, epoch: int,
                     max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int = 0, stop: tuple[str, ...] = STOP) -> tuple[list[Rollout], float]:
    """Samples group_size completions of every problem, all submitted at once, each its own
    request with its own seed (sample_seed). A problem is a code prompt (a str: its text, ended
    at a stop string, STOP: top-level code starts again, scored by `reward`) or a task with
    prompt_ids(tokenizer), stop and reward(completion) (harness/rl_tasks.py); a completion
    also ends at EOS or max_tokens. Returns the rollouts (problem-major, then sample) and the
    wall time of the batch in seconds (the epoch's rollout makespan)."""
    if group_size <= 0:
        raise ValueError(f"group_size={group_size} must be > 0")
    prompt_ids = [tuple(tokenizer.encode(p)) if isinstance(p, str) else p.prompt_ids(tokenizer)
                  for p in problems]  # (a code prompt: BOS as the engine adds it to text)
    stops = [stop if isinstance(p, str) else p.stop for p in problems]
    keys = [(i, k) for i in range(len(problems)) for k in range(group_size)]
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stops[i],
                             seed=sample_seed(seed, epoch, i, k)) for i, k in keys]
    start = time.perf_counter()
    outs = engine.generate([list(prompt_ids[i]) for i, _ in keys], params)
    seconds = time.perf_counter() - start
    rollouts = [Rollout(i, k, prompt_ids[i], tuple(o.token_ids), o.text, _score(problems[i], o.text),
                        o.finish_reason) for (i, k), o in zip(keys, outs)]
    return rollouts, seconds


def _score(problem, completion: str) -> float:
    return reward(problem, completion) if isinstance(problem, str) else problem.reward(completion)


def grpo_advantages(rewards: Sequence[float], group_size: int, eps: float = 1e-6) -> np.ndarray:
    """f32[N]: (r - group mean) / (group std + eps) over consecutive groups of group_size; a
    group whose rewards are all equal gets zeros."""
    r = np.asarray(rewards, np.float64)
    if r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of group_size={group_size}")
    groups = r.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, keepdims=True)
    adv = np.where(std > 0, centred / (std + eps), 0.0)
    return adv.reshape(-1).astype(np.float32)


# -- the policy update -----------------------------------------------------------------------


class PolicyTrainer:
    """The policy's parameters and optimizer; step() takes one GRPO-style gradient step.

    The policy is softmax(logits / temperature), the distribution the engine samples from at
    that temperature (top_p 1). Build it from the model the engine was made from (or a fresh
    load of the same checkpoint): the training forward (jinfer.models.training) does not use
    the paged attention, so the engine's attention backend does not matter. train_layers: update
    only the last that many decoder layers and the final norm (the embedding, and a tied head
    with it, stays), for a model too large to train whole on the host; None: every parameter.
    """

    def __init__(self, model: nnx.Module, *, learning_rate: float = 1e-4, temperature: float = 1.0,
                 max_grad_norm: float = 1.0, length_bucket: int = 64, train_layers: int | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (the policy samples)")
        num_layers = len(model.layers)
        if train_layers is not None and not 1 <= train_layers <= num_layers:
            raise ValueError(f"train_layers={train_layers} must be in [1, {num_layers}] (or None: all)")
        self.temperature = temperature
        self.length_bucket = length_bucket
        trained = nnx.Param if train_layers is None else _last_layers(num_layers - train_layers)
        self.graphdef, self.params, self.rest = nnx.split(model, trained, ...)
        self.optimizer = optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adam(learning_rate))
        self.opt_state = self.optimizer.init(self.params)
        # Not donated: the engine serves the very arrays state() hands it.
        self._update = jax.jit(self._update_fn)

    def _update_fn(self, params, rest, opt_state, ids, mask, adv):
        """ids i32[N, L]; mask f32[N, L-1] (1 where ids[:, 1:] is a completion token); adv f32[N].
        rest: what is not trained (an argument, not a constant baked into the program)."""
        def loss_fn(p):
            model = nnx.merge(self.graphdef, p, rest)
            logits = causal_forward(model, ids[:, :-1]) / self.temperature  # f32[N, L-1, vocab]
            logp = -optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])  # f32[N, L-1]
            per_rollout = (logp * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
            return -(per_rollout * adv).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(self, rollouts: Sequence[Rollout]) -> float:
        """One update on the rollouts of an epoch (problem-major, equal groups, as
        collect_rollouts returns them): loss = -mean over rollouts of its GRPO advantage x the
        mean log-probability of its completion tokens. Returns the loss before the update."""
        ids, mask = training_batch(rollouts, self.length_bucket)
        adv = grpo_advantages([r.reward for r in rollouts], _group_size(rollouts))
        self.params, self.opt_state, loss = self._update(self.params, self.rest, self.opt_state, ids, mask, adv)
        return float(loss)

    def state(self) -> nnx.State:
        """The whole model's state, shaped as nnx.split(model) gives it (Engine.update_weights)."""
        return nnx.split(nnx.merge(self.graphdef, self.params, self.rest))[1]


def _last_layers(first: int):
    """An nnx filter: the parameters of decoder layers first.. and of the final norm."""
    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return path[0] == "final_norm" or (path[0] == "layers" and int(path[1]) >= first)
    return keep


def training_batch(rollouts: Sequence[Rollout], length_bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(ids i32[N, L], mask f32[N, L-1]): each rollout's prompt + completion left-aligned and
    zero-padded to L, the next multiple of length_bucket (few shapes, few compilations); mask is
    1 where ids[:, 1:] is a completion token (position t predicts token t + 1), 0 on padding."""
    longest = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    length = -(-longest // length_bucket) * length_bucket
    ids = np.zeros((len(rollouts), length), np.int32)
    mask = np.zeros((len(rollouts), length - 1), np.float32)
    for row, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.token_ids)
        ids[row, :p + c] = r.prompt_ids + r.token_ids
        mask[row, p - 1:p - 1 + c] = 1.0
    return ids, mask


def _group_size(rollouts: Sequence[Rollout]) -> int:
    """The size of the rollouts' groups; ValueError unless they are problem-major equal groups."""
    problems = list(dict.fromkeys(r.problem for r in rollouts))
    size = len(rollouts) // max(len(problems), 1)
    if [r.problem for r in rollouts] != [p for p in problems for _ in range(size)]:
        raise ValueError("rollouts must come in equal groups, one problem after another "
                         "(as collect_rollouts returns them)")
    return size


# -- the loop --------------------------------------------------------------------------------


def run_epochs(engine, tokenizer, trainer: PolicyTrainer, problems: Sequence[str], *, epochs: int,
               group_size: int, max_tokens: int, seed: int = 0,
               on_epoch: Callable[[dict, list[Rollout]], None] | None = None) -> list[dict]:
    """epochs x (rollouts at the trainer's temperature, advantages, one trainer step, the new
    weights into the engine). Returns one record per epoch: epoch, makespan_s (rollouts' wall
    time), num_tokens (completion tokens), tokens_per_s, mean_reward, loss, train_s, lengths
    (completion tokens per rollout), and the epoch's speculation counters (draft_tokens,
    accepted_tokens, spec_steps: zero without a drafter). on_epoch(record, rollouts) hears each
    epoch as it ends."""
    records = []
    for epoch in range(epochs):
        before = engine.spec_stats()
        rollouts, makespan = collect_rollouts(engine, tokenizer, problems, group_size=group_size,
                                              epoch=epoch, max_tokens=max_tokens,
                                              temperature=trainer.temperature, seed=seed)
        spec = engine.spec_stats()
        start = time.perf_counter()
        loss = trainer.step(rollouts)
        engine.update_weights(trainer.state())
        lengths = [len(r.token_ids) for r in rollouts]
        record = dict(epoch=epoch, makespan_s=makespan, num_tokens=sum(lengths),
                      tokens_per_s=sum(lengths) / makespan, mean_reward=float(np.mean([r.reward for r in rollouts])),
                      loss=loss, train_s=time.perf_counter() - start, lengths=lengths,
                      draft_tokens=spec.draft_tokens - before.draft_tokens,
                      accepted_tokens=spec.accepted_tokens - before.accepted_tokens,
                      spec_steps=spec.spec_steps - before.spec_steps)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record, rollouts)
    return records
