"""Math word problems with checkable answers, for the RL loop (harness/rl.py) on a chat model.

Each task is a one-step arithmetic question ("Ana has 7 apples and buys 5 more. How many apples
does Ana have now?") drawn from a few templates with a fixed seed; the model gets it through its
chat template and the reward checks the answer: 1.0 when the last number the completion writes
is the task's, else 0.0. A completion ends at EOS or max_tokens (no stop strings), so a model
that reasons before answering writes the same kind of text again and again across epochs,
which is what DAS's per-problem drafter feeds on.
"""

from __future__ import annotations

import dataclasses
import random
import re

_NAMES = ("Ana", "Ben", "Carla", "Dev", "Ema", "Femi", "Gus", "Hana", "Ivo", "Jun")
_THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")  # 7, -3, 1,234, 12.5


@dataclasses.dataclass(frozen=True)
class MathTask:
    """A question and its answer (an integer)."""

    question: str
    answer: int
    stop: tuple[str, ...] = ()

    def prompt_ids(self, tokenizer) -> tuple[int, ...]:
        """The question as the model's chat template renders one user turn, ready to answer."""
        text = tokenizer.apply_chat_template([{"role": "user", "content": self.question}])
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    def reward(self, completion: str) -> float:
        """1.0 when the last number in the completion is the answer (thousands commas read as
        such, a decimal as its value), else 0.0."""
        numbers = _NUMBER.findall(completion)
        return float(bool(numbers) and float(numbers[-1].replace(",", "")) == self.answer)


def math_tasks(n: int, seed: int = 0) -> list[MathTask]:
    """n questions, the same for a given seed: addition, subtraction, multiplication and a price,
    in turn, with small numbers."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, things = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        kind = i % 4
        if kind == 0:
            q, ans = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", a + b
        elif kind == 1:
            a += b
            q, ans = f"{name} had {a} {things} and gave {b} away. How many {things} are left?", a - b
        elif kind == 2:
            q, ans = f"A box holds {a} {things}. How many {things} are in {b} boxes?", a * b
        else:
            q, ans = f"{name} buys {b} {things} at {a} dollars each. How many dollars does {name} pay?", a * b
        out.append(MathTask(q + " Explain briefly, then give the number.", ans))
    return out
