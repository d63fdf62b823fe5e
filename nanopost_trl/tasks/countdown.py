"""Countdown: combine the given numbers with + - * / and parentheses to hit a target. Generated offline from seeds.

Each problem draws 3-4 numbers in 1..99 and folds all of them, in a random order, with random operations into an
integer target in 1..999, so every problem is solvable by construction. Train and test come from disjoint seed
ranges, and no train problem (same numbers and target) appears in test. The model answers `<answer>EQ</answer>`;
the equation is parsed with `ast` and evaluated over exact fractions, never executed.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import operator
import random
from fractions import Fraction

from nanopost_trl.base import Prompt, TaskInstance

SOURCE = "generated offline from seeds"
SIZES = {"train": 10_000, "test": 500}
FIRST_SEED = {"train": 0, "test": 1_000_000}
MAX_EQUATION_CHARS = 200  # an equation over 4 two-digit numbers fits in far less; also bounds ast.parse's work
ANSWER_PATTERN = r"<answer>[^<]+</answer>"  # for `rewards.Format` (linear time to search)
SYMBOLS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
OPERATORS = dict(zip((ast.Add, ast.Sub, ast.Mult, ast.Div), SYMBOLS.values(), strict=True))
ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Constant, *OPERATORS)


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int
    solution: str  # the equation the problem was built from


def make_problem(seed: int) -> Problem:
    """A solvable problem drawn from `seed` (deterministic); the numbers are shown in shuffled order."""
    rng = random.Random(seed)
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        value, equation = Fraction(numbers[0]), str(numbers[0])
        for number in numbers[1:]:
            symbol, swap = rng.choice(tuple(SYMBOLS)), rng.random() < 0.5
            left, right = (Fraction(number), value) if swap else (value, Fraction(number))
            if symbol == "/" and right == 0:
                break
            value = SYMBOLS[symbol](left, right)
            inner = f"({equation})" if " " in equation else equation
            equation = f"{number} {symbol} {inner}" if swap else f"{inner} {symbol} {number}"
        else:
            if value.denominator == 1 and 1 <= value <= 999:
                return Problem(tuple(rng.sample(numbers, len(numbers))), int(value), equation)


def evaluate(equation: str, numbers: tuple[int, ...] | list[int]) -> Fraction | None:
    """The exact value of `equation`, or None unless it uses only + - * /, parentheses and integer literals drawn
    from `numbers` (each at most as often as given), and divides by no zero."""
    if len(equation) > MAX_EQUATION_CHARS:
        return None
    try:
        tree = ast.parse(equation.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = list(ast.walk(tree))
    if not all(isinstance(node, ALLOWED_NODES) for node in nodes):
        return None
    used = [node.value for node in nodes if isinstance(node, ast.Constant)]
    if any(type(value) is not int for value in used) or collections.Counter(used) - collections.Counter(numbers):
        return None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        return None


def _value(node: ast.expr) -> Fraction:
    # Depth is at most len(numbers): evaluate() has checked every leaf is one of the given numbers.
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)
    return OPERATORS[type(node.op)](_value(node.left), _value(node.right))


def extract_equation(completion: str) -> str | None:
    """The left-hand side of the equation in the last `<answer>...</answer>` ("(1 + 2) * 3 = 9" -> "(1 + 2) * 3")."""
    start = completion.rfind("<answer>")
    end = completion.find("</answer>", start)
    if start < 0 or end < 0:
        return None
    return completion[start + len("<answer>") : end].split("=", 1)[0]


def grade(completion: str, numbers: tuple[int, ...], target: int) -> float:
    """1.0 if the answered equation is valid over `numbers` and equals `target` exactly, else 0.0."""
    equation = extract_equation(completion)
    return float(equation is not None and evaluate(equation, numbers) == target)


def prompt(problem: Problem) -> Prompt:
    numbers = ", ".join(map(str, problem.numbers))
    return [
        {
            "role": "user",
            "content": f"Using the numbers [{numbers}], write an equation that equals {problem.target}. "
            "You may use + - * / and parentheses, and each number at most once. Think step by step, then give "
            "only the equation inside <answer></answer> tags, for example <answer>(1 + 2) / 3</answer>.",
        }
    ]


def problems(split: str) -> list[Problem]:
    """The problems of `split`; train skips any problem that is also in test."""
    if split not in SIZES:
        raise ValueError(f"countdown has splits {tuple(SIZES)}, not {split!r}")
    first = FIRST_SEED[split]
    drawn = [make_problem(seed) for seed in range(first, first + SIZES[split])]
    if split == "train":
        held_out = {(tuple(sorted(p.numbers)), p.target) for p in problems("test")}
        drawn = [p for p in drawn if (tuple(sorted(p.numbers)), p.target) not in held_out]
    return drawn


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """Countdown instances for "train" or "test"; `data_dir` is unused (the task is generated)."""
    return [
        TaskInstance("countdown", prompt(p), functools.partial(grade, numbers=p.numbers, target=p.target))
        for p in problems(split)
    ]
