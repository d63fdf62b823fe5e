"""Offline 2-digit addition, the task of the embedded tiny model (`nanopost_trl/assets/tiny`).

Format: the user message is `"{a}+{b}="` with 10 <= a, b <= 99; the answer is the digits of a + b written
least-significant first, so carries flow in the order the model writes them:
`"47+38="` -> `"58"` (85), `"99+99="` -> `"891"` (198).
Grading is exact match after stripping surrounding whitespace (1.0 / 0.0).

Splits are generated, not downloaded (`data_dir` is ignored): the 8100 operand pairs are shuffled with a fixed seed;
the first `TEST_SIZE` pairs are "test", the rest "train", so the splits are disjoint and the same on every machine.
"""

from __future__ import annotations

import functools
import random

from nanopost_trl.base import TaskInstance

NAME = "addition"
SOURCE = "embedded, offline (the tiny model's task)"
SPLITS = ("train", "test")
SEED = 0
TEST_SIZE = 1000
OPERANDS = range(10, 100)


def prompt_text(a: int, b: int) -> str:
    """The user message for a + b."""
    return f"{a}+{b}="


def target_completion(a: int, b: int) -> str:
    """The correct completion for a + b: its decimal digits, least-significant first."""
    return str(a + b)[::-1]


def exact_match(completion: str, target: str) -> float:
    """1.0 if `completion` equals `target` up to surrounding whitespace, else 0.0. Never raises."""
    return float(isinstance(completion, str) and completion.strip() == target)


def operand_pairs(split: str) -> list[tuple[int, int]]:
    """The (a, b) pairs of a split, in a fixed shuffled order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for task {NAME!r}; valid: {', '.join(SPLITS)}")
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    random.Random(SEED).shuffle(pairs)
    return pairs[:TEST_SIZE] if split == "test" else pairs[TEST_SIZE:]


def make_instance(a: int, b: int) -> TaskInstance:
    """A chat-message TaskInstance for a + b, graded by exact match."""
    prompt = [{"role": "user", "content": prompt_text(a, b)}]
    return TaskInstance(NAME, prompt, functools.partial(exact_match, target=target_completion(a, b)))


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """The instances of `split` ("train": 7100, "test": 1000)."""
    return [make_instance(a, b) for a, b in operand_pairs(split)]
