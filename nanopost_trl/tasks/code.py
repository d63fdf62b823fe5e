"""Python function problems graded by running the model's code against hidden unit tests in the sandbox.

`load(split)` generates the problems offline: short string, list and number exercises ("Write a Python function
`add_7(x)` that returns x plus 7. For example, `add_7(3)` should return `10`."), from `FAMILIES` with their
constants, shuffled with a fixed seed; the first `TEST_SIZE` are "test", the rest "train". Each has `TESTS_PER_PROBLEM`
hidden tests whose inputs are drawn from a seeded generator and whose expected outputs come from the family's
reference solution, run here (trusted code). `from_dataset` reads problems a user brings: MBPP-style rows (`text` or
`prompt`, `test_list`, optionally `test_setup_code` / `test_imports`) or HumanEval-style rows (`prompt` code, `test`
defining `check(candidate)`, `entry_point`).

The grader (`CodeGrader`, the instance's eval_fn) takes the model's code from its reply (the first fenced block,
```python ... ```, that defines the function; else the first block), runs it in `nanopost_trl.sandbox` followed by
the tests, each in its own `try`, and scores the fraction of tests that passed: partial credit. With
`all_or_nothing=True` the score is 1.0 only when every test passed. A generated problem's test asserts
`_same(got, expected)`: equal values of the same type (an object whose `__eq__` is always true does not pass).
A HumanEval row's `check` is one test, so it scores all or nothing; an MBPP row has one test per assert. Tests that
passed before a time-out or a crash still count.

Every graded program is counted by how it ended in the training step's metrics, `program_{kind}` for each of
`KINDS` (passed, failed_tests, missing: no code block, then the sandbox's outcomes: error, timeout, memory,
output_limit, file_limit, signal, sandbox_error), and `sandbox_time_s`: the seconds the reward spent waiting for the
sandbox (programs run in parallel, started all at once by `Correctness`'s prefetch).

The test harness runs inside the program's own process, so a program can still reach it (read the tests, print a
forged report if it finds the per-run nonce): the sandbox protects the machine, not the reward from a determined
program. Use a held-out test set and read samples (`completions.jsonl`).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import dataclasses
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import datasets

from nanopost_trl import sandbox
from nanopost_trl.base import TaskInstance
from nanopost_trl.rewards import count_grader_event
from nanopost_trl.tasks.custom import load_rows

NAME = "code"
SOURCE = "generated offline (Python functions with hidden tests, run in the sandbox)"
SEED = 0
TEST_SIZE = 60
TESTS_PER_PROBLEM = 5
LIMITS = sandbox.Limits(wall_s=2.0, cpu_s=2, output_kb=64)  # a short exercise needs far less
KINDS = ("passed", "failed_tests", "missing") + tuple(o.value for o in sandbox.Outcome if o is not sandbox.Outcome.OK)
INSTRUCTION = "Reply with the complete function in a ```python code block."
_BLOCK = re.compile(r"```[ \t]*(?:python3|python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_CALLED_NAME = re.compile(r"([A-Za-z_]\w*)\s*\(")
WORDS = (
    "apple", "banana", "level", "robot", "noon", "python", "hello", "world", "racecar", "data", "code", "kayak",
    "tree", "stats", "moon", "sun", "radar", "table", "river", "civic", "paper", "lamp", "refer", "green",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CodeProblem:
    """What one problem's program needs: `tests` are Python statements (a test passes when it raises nothing),
    run after `preamble`, the model's code and `setup`, in one namespace; `entry_point` picks the code block."""

    prompt: str
    tests: tuple[str, ...]
    entry_point: str | None = None
    setup: str = ""
    preamble: str = ""


def extract_code(completion: str, entry_point: str | None = None) -> str | None:
    """The first fenced code block that defines `entry_point`, else the first one (an unclosed block at the end
    counts); None without one."""
    blocks = [block for block in _BLOCK.findall(completion) if block.strip()]
    if entry_point is not None:
        defines = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        blocks = [block for block in blocks if defines.search(block)] or blocks
    return blocks[0] if blocks else None


_HARNESS = """\
def _harness(preamble, solution, setup, tests, nonce):
    import os

    report, same_type = os.write, type

    def same(got, expected):
        return same_type(got) is same_type(expected) and got == expected

    namespace = {"__name__": "solution"}
    for source, filename in ((preamble, "preamble.py"), (solution, "solution.py"), (setup, "setup.py")):
        exec(compile(source, filename, "exec"), namespace)
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{index}.py", "exec"), {**namespace, "_same": same})
            report(1, f"\\n{nonce} {index} passed\\n".encode())
        except Exception:
            pass


_harness(%r, %r, %r, %r, %r)
"""


def harness_program(problem: CodeProblem, solution: str, nonce: str) -> str:
    """The program the sandbox runs: the solution and `problem`'s tests; it prints `nonce i passed` per test."""
    return _HARNESS % (problem.preamble, solution, problem.setup, problem.tests, nonce)


def tests_passed(stdout: str, nonce: str, num_tests: int) -> int:
    """How many distinct tests the harness reported as passed."""
    indices = {int(index) for index in re.findall(rf"^{nonce} (\d+) passed$", stdout, re.MULTILINE)}
    return len(indices & set(range(num_tests)))


@dataclasses.dataclass(eq=False)
class CodeGrader:
    """A code TaskInstance's eval_fn: the fraction of `problem.tests` the completion's code passes (1.0 or 0.0 with
    `all_or_nothing`), run in `runner` (default: the process's shared sandbox) under `limits`."""

    problem: CodeProblem
    all_or_nothing: bool = False
    limits: sandbox.Limits = LIMITS
    runner: sandbox.Sandbox | None = None
    _started: dict[str, list[tuple[concurrent.futures.Future, str]]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def prefetch(self, completion: str) -> None:
        """Start the completion's program now (`Correctness` does it for a whole batch); `__call__` collects it."""
        started = self._submit(completion)
        if started is not None:
            self._started.setdefault(completion, []).append(started)

    def __call__(self, completion: str) -> float:
        for name in [f"program_{kind}" for kind in KINDS] + ["sandbox_time_s"]:  # in every step's metrics, 0 included
            count_grader_event(name, 0.0)
        prefetched = self._started.get(completion)
        started = prefetched.pop(0) if prefetched else self._submit(completion)
        if prefetched == []:
            del self._started[completion]
        if started is None:
            count_grader_event("program_missing")
            return 0.0
        future, nonce = started
        wait_start = time.perf_counter()
        result = future.result()
        count_grader_event("sandbox_time_s", time.perf_counter() - wait_start)
        total = len(self.problem.tests)
        passed = tests_passed(result.stdout, nonce, total)
        kind = "passed" if passed == total else "failed_tests" if result.ok else result.outcome.value
        count_grader_event(f"program_{kind}")
        return float(passed == total) if self.all_or_nothing else passed / total

    def _submit(self, completion: str) -> tuple[concurrent.futures.Future, str] | None:
        solution = extract_code(completion, self.problem.entry_point)
        if solution is None:
            return None
        nonce = secrets.token_hex(8)
        runner = self.runner or sandbox.default_sandbox()
        return runner.submit(harness_program(self.problem, solution, nonce), self.limits), nonce


def make_instance(problem: CodeProblem, all_or_nothing: bool = False, name: str = NAME, **grader: Any) -> TaskInstance:
    """A chat TaskInstance asking `problem.prompt`, graded by a `CodeGrader` (`grader`: its limits, runner)."""
    messages = [{"role": "user", "content": problem.prompt}]
    return TaskInstance(name, messages, CodeGrader(problem, all_or_nothing, **grader))


# --- the generated problems


@dataclasses.dataclass(frozen=True)
class Family:
    """Problems of one shape: `name`, `task` and `body` may hold `{k}`, filled from each of `constants`."""

    name: str
    params: str
    task: str
    body: str  # the reference solution's body (4-space indented lines after the first)
    inputs: Callable[[random.Random], tuple]  # one call's arguments
    constants: Sequence[Any] = (None,)


def _int(rng: random.Random) -> tuple:
    return (rng.randint(-50, 99),)


def _natural(rng: random.Random) -> tuple:
    return (rng.randint(0, 9999),)


def _two_ints(rng: random.Random) -> tuple:
    return rng.randint(-50, 99), rng.randint(-50, 99)


def _numbers(rng: random.Random) -> tuple:
    return ([rng.randint(-20, 50) for _ in range(rng.randint(1, 6))],)


def _word(rng: random.Random) -> tuple:
    return (rng.choice(WORDS),)


def _sentence(rng: random.Random) -> tuple:
    return (" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),)


def _words(rng: random.Random) -> tuple:
    return ([rng.choice(WORDS) for _ in range(rng.randint(1, 4))],)


def _two_words(rng: random.Random) -> tuple:
    return rng.choice(WORDS), rng.choice(WORDS)


FAMILIES = (
    Family("add_{k}", "x", "returns x plus {k}", "return x + {k}", _int, range(2, 40)),
    Family("times_{k}", "x", "returns x multiplied by {k}", "return x * {k}", _int, range(2, 20)),
    Family("minus_{k}", "x", "returns x minus {k}", "return x - {k}", _int, range(2, 40)),
    Family(
        "is_divisible_by_{k}",
        "x",
        "returns True if x is divisible by {k}, else False",
        "return x % {k} == 0",
        _int,
        range(2, 13),
    ),  # fmt: skip
    Family("square", "x", "returns x squared", "return x * x", _int),
    Family("cube", "x", "returns x cubed", "return x * x * x", _int),
    Family("is_even", "x", "returns True if x is even, else False", "return x % 2 == 0", _int),
    Family("is_odd", "x", "returns True if x is odd, else False", "return x % 2 == 1", _int),
    Family("absolute", "x", "returns the absolute value of x", "return abs(x)", _int),
    Family(
        "sum_digits",
        "x",
        "returns the sum of the digits of the non-negative integer x",
        "return sum(int(digit) for digit in str(x))",
        _natural,
    ),  # fmt: skip
    Family(
        "sum_to_n",
        "n",
        "returns the sum of the integers from 1 to n",
        "return n * (n + 1) // 2",
        lambda rng: (rng.randint(1, 200),),
    ),  # fmt: skip
    Family(
        "factorial",
        "n",
        "returns n factorial (1 when n is 0)",
        "result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
        lambda rng: (rng.randint(0, 10),),
    ),  # fmt: skip
    Family("larger", "a, b", "returns the larger of a and b", "return max(a, b)", _two_ints),
    Family("smaller", "a, b", "returns the smaller of a and b", "return min(a, b)", _two_ints),
    Family("add", "a, b", "returns the sum of a and b", "return a + b", _two_ints),
    Family("sum_list", "numbers", "returns the sum of the list numbers", "return sum(numbers)", _numbers),
    Family("max_list", "numbers", "returns the largest number in the list numbers", "return max(numbers)", _numbers),
    Family("min_list", "numbers", "returns the smallest number in the list numbers", "return min(numbers)", _numbers),
    Family("count_items", "items", "returns the number of items in the list items", "return len(items)", _numbers),
    Family("first_item", "items", "returns the first item of the list items", "return items[0]", _numbers),
    Family("last_item", "items", "returns the last item of the list items", "return items[-1]", _numbers),
    Family("reverse_list", "items", "returns the list items reversed", "return items[::-1]", _numbers),
    Family(
        "times_{k}_all",
        "numbers",
        "returns a list of every number in numbers multiplied by {k}",
        "return [n * {k} for n in numbers]",
        _numbers,
        range(2, 10),
    ),  # fmt: skip
    Family(
        "add_{k}_to_all",
        "numbers",
        "returns a list of every number in numbers plus {k}",
        "return [n + {k} for n in numbers]",
        _numbers,
        range(1, 10),
    ),  # fmt: skip
    Family(
        "keep_even",
        "numbers",
        "returns a list of the even numbers in numbers, in order",
        "return [n for n in numbers if n % 2 == 0]",
        _numbers,
    ),  # fmt: skip
    Family(
        "count_positive",
        "numbers",
        "returns how many numbers in the list numbers are greater than 0",
        "return sum(1 for n in numbers if n > 0)",
        _numbers,
    ),  # fmt: skip
    Family("reverse_string", "s", "returns the string s reversed", "return s[::-1]", _sentence),
    Family("to_upper", "s", "returns the string s in upper case", "return s.upper()", _sentence),
    Family("string_length", "s", "returns the number of characters in the string s", "return len(s)", _sentence),
    Family(
        "count_letter_{k}",
        "s",
        "returns how many times the letter '{k}' appears in the string s",
        "return s.count('{k}')",
        _sentence,
        "aeiorstnlc",
    ),  # fmt: skip
    Family(
        "count_vowels",
        "s",
        "returns how many vowels (a, e, i, o, u) the string s has",
        "return sum(1 for c in s if c in 'aeiou')",
        _sentence,
    ),  # fmt: skip
    Family("repeat_{k}", "s", "returns the string s repeated {k} times", "return s * {k}", _word, range(2, 6)),
    Family(
        "is_palindrome",
        "s",
        "returns True if the string s reads the same backwards, else False",
        "return s == s[::-1]",
        _word,
    ),  # fmt: skip
    Family("first_char", "s", "returns the first character of the string s", "return s[0]", _word),
    Family("count_words", "s", "returns the number of words in the string s", "return len(s.split())", _sentence),
    Family(
        "join_words",
        "words",
        "returns the strings in the list words joined with single spaces",
        "return ' '.join(words)",
        _words,
    ),  # fmt: skip
    Family("concat", "a, b", "returns the strings a and b joined together", "return a + b", _two_words),
)


def generated_problem(family: Family, constant: Any) -> CodeProblem:
    """One problem of `family`; expected outputs from its reference solution, run here (trusted code)."""
    name = family.name.format(k=constant)
    body = family.body.format(k=constant)
    reference: dict[str, Any] = {}
    exec(f"def {name}({family.params}):\n    {body}\n", reference)
    rng = random.Random(f"{name}-{SEED}")
    example, *calls = [family.inputs(rng) for _ in range(TESTS_PER_PROBLEM + 1)]

    def call(arguments: tuple) -> str:
        return f"{name}({', '.join(map(repr, arguments))})"

    expected = reference[name](*example)
    prompt = (
        f"Write a Python function `{name}({family.params})` that {family.task.format(k=constant)}. "
        f"For example, `{call(example)}` should return `{expected!r}`.\n{INSTRUCTION}"
    )
    tests = tuple(f"assert _same({call(arguments)}, {reference[name](*arguments)!r})" for arguments in calls)
    return CodeProblem(prompt, tests, entry_point=name)


def reference_solution(family: Family, constant: Any) -> str:
    """The family's reference solution as a fenced reply (tests use it: it must pass every test)."""
    name, body = family.name.format(k=constant), family.body.format(k=constant)
    return f"```python\ndef {name}({family.params}):\n    {body}\n```"


def problems(split: str) -> list[tuple[Family, Any]]:
    """The (family, constant) pairs of `split`: seeded shuffle, the first TEST_SIZE are "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"{NAME} has splits ('train', 'test'), not {split!r}")
    pairs = [(family, constant) for family in FAMILIES for constant in family.constants]
    random.Random(SEED).shuffle(pairs)
    return pairs[:TEST_SIZE] if split == "test" else pairs[TEST_SIZE:]


def load(split: str, data_dir: str | None = None, all_or_nothing: bool = False) -> list[TaskInstance]:
    """The generated instances of `split` ("train": 105, "test": 60); `data_dir` is ignored (nothing is
    downloaded). `all_or_nothing`: score 1.0 only when every test passes (default: the fraction passed)."""
    return [make_instance(generated_problem(*pair), all_or_nothing) for pair in problems(split)]


# --- problems a user brings


def _mbpp_entry_point(test: str) -> str | None:
    """The first function an MBPP assert calls that is not a builtin (`assert set(f(x)) == ...` -> f)."""
    names = [name for name in _CALLED_NAME.findall(test) if not hasattr(builtins, name) and name != "isclose"]
    return names[0] if names else None


def _row_problem(row: dict, index: int) -> CodeProblem:
    if row.get("test_list"):  # MBPP (original: text, test_setup_code; sanitized: prompt, test_imports)
        text = row.get("text") or row.get("prompt")
        tests = tuple(row["test_list"])
        setup = "\n".join([*(row.get("test_imports") or []), row.get("test_setup_code") or ""])
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {index}: an MBPP-style row needs a non-empty 'text' or 'prompt'")
        prompt = f"{text.strip()}\nYour code should pass tests like this one:\n{tests[0]}\n{INSTRUCTION}"
        return CodeProblem(prompt, tests, _mbpp_entry_point(tests[0]), setup=setup)
    if row.get("test") and row.get("entry_point"):  # HumanEval: the prompt is the function's signature + docstring
        code = row.get("prompt")
        if not isinstance(code, str) or not code.strip():
            raise ValueError(f"row {index}: a HumanEval-style row needs a non-empty 'prompt'")
        prompt = f"Complete this Python function:\n```python\n{code}```\n{INSTRUCTION}"
        entry_point = row["entry_point"]
        return CodeProblem(prompt, (f"check({entry_point})",), entry_point, setup=row["test"], preamble=code)
    raise ValueError(
        f"row {index}: expected MBPP-style columns ('text' or 'prompt', non-empty 'test_list') or HumanEval-style "
        f"columns ('prompt', 'test', 'entry_point'); got {sorted(row)}"
    )


def from_dataset(
    source: datasets.Dataset | str | os.PathLike,
    split: str = "train",
    name: str = NAME,
    all_or_nothing: bool = False,
    limits: sandbox.Limits = LIMITS,
) -> list[TaskInstance]:
    """One code TaskInstance per MBPP- or HumanEval-style row of `source` (a Dataset, a local .jsonl/.json/.parquet
    file, or a Hub id's `split`), graded in the sandbox under `limits`. A row with neither style's columns raises a
    ValueError naming the row."""
    rows = load_rows(source, split)
    return [
        make_instance(_row_problem(row, index), all_or_nothing, name=name, limits=limits)
        for index, row in enumerate(rows)
    ]
