"""Multiplication with a calculator tool: "What is 7 * 43?", for real instruct LLMs that learn to call a tool.

One-digit times two-digit (2 <= a <= 9, 10 <= b <= 99) and two-digit times two-digit (10 <= a, b <= 99) products,
generated offline: the pairs are shuffled with a fixed seed, the first `TEST_SIZE` are "test" and the rest "train"
(disjoint, the same on every machine). Each instance carries the `calculator` tool; the completion is a multi-turn
episode (TRL's tool loop), and the `numeric` grader scores the final assistant message's last number.

The prompt's system message says a calculator is available, and two worked episodes (`EXAMPLES`: the question, the
call, the tool's result, the answer) come before the question: without them SmolLM2-135M-Instruct never writes a
`<tool_call>` (benchmarks/RESULTS.md, "A tool task on a real LLM"). The tool schema comes from `calculator`'s type
hints and docstring. The model's chat template must render tools (`TrainConfig.chat_template`: 'qwen2_5' for SmolLM2).
`make_instance(a, b, with_tool=False)` is the same prompt without the tool (the examples answered directly): the
baseline a tool has to beat.
"""

from __future__ import annotations

import random
import re

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.graders import AnswerGrader, grade_numeric

NAME = "multiplication"
SOURCE = "generated offline (with a calculator tool)"
SPLITS = ("train", "test")
SEED = 0
TEST_SIZE = 500
SYSTEM = "You are a helpful assistant. Use the calculator tool for arithmetic, then answer with just the number."
SYSTEM_WITHOUT_TOOL = "You are a helpful assistant. Answer with just the number."
EXAMPLES = ((6, 37), (23, 41))  # worked episodes in every prompt, in neither split
MAX_OPERAND_CHARS = 30  # a longer number is not a calculator input (and keeps every call cheap)
_EXPRESSION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)\s*")


def calculator(expression: str) -> str:
    """Evaluate one arithmetic operation on two numbers.

    Args:
        expression: Two numbers and one operator among + - * /, e.g. "7 * 43".
    """
    # The model wrote `expression`: it is parsed as two numbers and an operator, never evaluated as code.
    match = _EXPRESSION.fullmatch(expression) if len(expression) <= 2 * MAX_OPERAND_CHARS + 8 else None
    if match is None:
        raise ValueError(f"expected two numbers and one operator (+ - * /), got {expression[:80]!r}")
    left, operator, right = float(match[1]), match[2], float(match[3])
    if operator == "/" and right == 0:
        raise ValueError("division by zero")
    value = {"+": left + right, "-": left - right, "/": left / right}.get(operator, left * right)
    return str(int(value)) if value == int(value) else f"{value:.6g}"


def question(a: int, b: int) -> str:
    """The user message for a * b."""
    return f"What is {a} * {b}?"


def operand_pairs(split: str) -> list[tuple[int, int]]:
    """The (a, b) pairs of a split, in a fixed shuffled order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for task {NAME!r}; valid: {', '.join(SPLITS)}")
    pairs = [(a, b) for a in range(2, 100) for b in range(10, 100) if (a, b) not in EXAMPLES]
    random.Random(SEED).shuffle(pairs)
    return pairs[:TEST_SIZE] if split == "test" else pairs[TEST_SIZE:]


def worked_example(a: int, b: int, with_tool: bool = True) -> list[dict]:
    """The messages of one solved question: with the tool, the call, its result and the answer; else the answer."""
    answer = {"role": "assistant", "content": str(a * b)}
    if not with_tool:
        return [{"role": "user", "content": question(a, b)}, answer]
    arguments = {"expression": f"{a} * {b}"}
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": calculator.__name__, "arguments": arguments}}]}  # fmt: skip
    result = {"role": "tool", "name": calculator.__name__, "content": calculator(arguments["expression"])}
    return [{"role": "user", "content": question(a, b)}, call, result, answer]


def make_instance(a: int, b: int, with_tool: bool = True) -> TaskInstance:
    """A chat TaskInstance for a * b (the worked `EXAMPLES` first), graded by the numeric grader on the final answer;
    with the calculator tool, or without it (the baseline)."""
    examples = [message for x, y in EXAMPLES for message in worked_example(x, y, with_tool)]
    system = {"role": "system", "content": SYSTEM if with_tool else SYSTEM_WITHOUT_TOOL}
    prompt = [system, *examples, {"role": "user", "content": question(a, b)}]
    return TaskInstance(NAME, prompt, AnswerGrader(grade_numeric, str(a * b)), tools=(calculator,) if with_tool else ())


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """The instances of `split` ("train": 8318, "test": 500); `data_dir` is ignored (nothing is downloaded)."""
    return [make_instance(a, b) for a, b in operand_pairs(split)]
