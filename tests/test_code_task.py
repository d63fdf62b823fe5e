"""The code task: generated problems and their hidden tests, code extraction, partial credit, MBPP/HumanEval rows,
and the per-kind counts a training step logs. Programs run in the real sandbox."""

from __future__ import annotations

import json

import datasets
import pytest

from nanopost_trl.config import Preset
from nanopost_trl.rewards import Correctness, RewardAdapter, counting_graders
from nanopost_trl.sandbox import Limits, Sandbox
from nanopost_trl.tasks import code, resolve_tasks
from nanopost_trl.trainer import Trainer

LIMITS = Limits(wall_s=1.0, cpu_s=1, output_kb=64)


@pytest.fixture(scope="module")
def box():
    runner = Sandbox(workers=2, limits=LIMITS)
    yield runner
    runner.close()


def grade(box: Sandbox, problem: code.CodeProblem, replies: list[str], **options) -> tuple[list[float], dict]:
    instances = [code.make_instance(problem, runner=box, limits=LIMITS, **options)] * len(replies)
    with counting_graders() as counts:
        scores = Correctness()(replies, instances)
    return scores, {name: value for name, value in counts.items() if value}


def fenced(source: str) -> str:
    return f"Here you go:\n```python\n{source}\n```\nDone."


def test_splits_are_disjoint_deterministic_and_registered():
    train, test = code.problems("train"), code.problems("test")
    names = [{code.generated_problem(*pair).entry_point for pair in split} for split in (train, test)]
    assert len(test) == code.TEST_SIZE and not names[0] & names[1]
    assert len(train) + len(test) == sum(len(family.constants) for family in code.FAMILIES)
    assert [i.prompt for i in resolve_tasks("code", "test")] == [i.prompt for i in code.load("test")]
    with pytest.raises(ValueError, match="code has splits"):
        code.load("validation")


def test_every_reference_solution_passes_its_hidden_tests(box):
    pairs = code.problems("train") + code.problems("test")
    instances = [code.make_instance(code.generated_problem(*pair), runner=box, limits=LIMITS) for pair in pairs]
    with counting_graders() as counts:
        scores = Correctness()([code.reference_solution(*pair) for pair in pairs], instances)
    assert scores == [1.0] * len(pairs)
    assert counts["program_passed"] == len(pairs) and counts["sandbox_time_s"] > 0


def test_prompt_shows_one_example_that_is_not_a_hidden_test():
    problem = code.generated_problem(code.FAMILIES[0], 7)
    assert problem.prompt.startswith("Write a Python function `add_7(x)` that returns x plus 7. For example, `add_7(")
    assert "```python" in problem.prompt and len(problem.tests) == code.TESTS_PER_PROBLEM
    example = problem.prompt.split("For example, `")[1].split("`")[0]
    assert all(example not in test for test in problem.tests)


def test_partial_credit_is_the_fraction_passed_or_all_or_nothing(box):
    problem = code.CodeProblem("p", ("assert _same(f(1), 1)", "assert _same(f(-2), 2)", "assert _same(f(3), 3)"), "f")
    identity = fenced("def f(x):\n    return x")
    scores, counts = grade(box, problem, [identity])
    assert scores == [2 / 3] and counts.keys() == {"program_failed_tests", "sandbox_time_s"}
    assert grade(box, problem, [identity], all_or_nothing=True)[0] == [0.0]
    assert grade(box, problem, [fenced("def f(x):\n    return abs(x)")], all_or_nothing=True)[0] == [1.0]


def test_tests_passed_before_a_timeout_count(box):
    problem = code.CodeProblem("p", ("assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"), "f")
    scores, counts = grade(box, problem, [fenced("def f(x):\n    while x == 3:\n        pass\n    return x")])
    assert scores == [2 / 3] and counts["program_timeout"] == 1


def test_equality_needs_the_same_type(box):
    problem = code.generated_problem(next(f for f in code.FAMILIES if f.name == "is_even"), None)
    cheats = [
        fenced("def is_even(x):\n    return int(x % 2 == 0)"),  # 1/0 instead of True/False
        fenced("class Same:\n    def __eq__(self, other):\n        return True\n\ndef is_even(x):\n    return Same()"),
    ]
    assert grade(box, problem, cheats)[0] == [0.0, 0.0]


def test_extract_code_picks_the_block_that_defines_the_function():
    usage = "```python\nprint(f(2))\n```"
    definition = "```py\ndef f(x):\n    return x\n```"
    assert code.extract_code(f"{usage}\n{definition}", "f") == "def f(x):\n    return x\n"
    assert code.extract_code(f"{usage}\n{definition}") == "print(f(2))\n"
    assert code.extract_code("```python\ndef f(x):\n    return x", "f") == "def f(x):\n    return x"  # cut off
    assert code.extract_code("def f(x): return x") is None
    assert code.extract_code("```bash\nls\n```") is None


def test_replies_without_code_score_zero_and_count_as_missing(box):
    problem = code.generated_problem(code.FAMILIES[0], 3)
    assert grade(box, problem, ["def add_3(x): return x + 3"]) == ([0.0], {"program_missing": 1.0})


def test_a_training_run_logs_the_counts_by_kind(tmp_path):
    """TINY_SMOKE on `code`: the embedded model writes no code block, so each step counts its 8 programs missing."""
    cfg = Preset.TINY_SMOKE.make(out_dir=str(tmp_path), eval_size=4, save_final_model=False)
    summary = Trainer(cfg).run(tasks="code")
    steps = [row for row in map(json.loads, summary.log_path.read_text().splitlines()) if "loss" in row]
    assert len(steps) == cfg.num_steps
    for row in steps:
        assert {name: row[name] for name in row if name.startswith("program_")} == {
            f"program_{kind}": 8.0 if kind == "missing" else 0.0 for kind in code.KINDS
        }
        assert row["sandbox_time_s"] == 0.0 and row["reward_mean"] == 0.0


def test_reward_adapter_logs_every_kind_through_log_metric(box):
    problem = code.generated_problem(code.FAMILIES[0], 3)
    instance = code.make_instance(problem, runner=box, limits=LIMITS)
    replies = [code.reference_solution(code.FAMILIES[0], 3), "no code", fenced("while True:\n    pass")]
    logged: dict[str, float] = {}
    adapter = RewardAdapter(Correctness(), [instance])
    scores = adapter(["p"] * 3, replies, [0, 0, 0], log_metric=logged.__setitem__)
    assert scores == [1.0, 0.0, 0.0] and adapter.take_counts() == (0, 0)
    assert set(logged) == {f"program_{kind}" for kind in code.KINDS} | {"sandbox_time_s"}
    counted = {name: value for name, value in logged.items() if value and name != "sandbox_time_s"}
    assert counted == {"program_passed": 1.0, "program_missing": 1.0, "program_timeout": 1.0}
    assert LIMITS.wall_s <= logged["sandbox_time_s"] < LIMITS.wall_s + 2.0  # the wait, programs run in parallel


MBPP_ROW = {
    "text": "Write a function to find the shared elements of two lists.",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == {4, 5}",
        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == {3, 4}",
    ],
    "test_setup_code": "",
}
HUMANEVAL_ROW = {
    "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
    "entry_point": "total",
}


def test_from_dataset_reads_mbpp_and_humaneval_rows(box):
    [mbpp] = code.from_dataset(datasets.Dataset.from_list([MBPP_ROW]), limits=LIMITS)
    [humaneval] = code.from_dataset(datasets.Dataset.from_list([HUMANEVAL_ROW]), limits=LIMITS)
    assert mbpp.eval_fn.problem.entry_point == "similar_elements"
    assert MBPP_ROW["test_list"][0] in mbpp.prompt[0]["content"]
    assert humaneval.eval_fn.problem.tests == ("check(total)",)
    mbpp = code.make_instance(mbpp.eval_fn.problem, runner=box, limits=LIMITS)
    humaneval = code.make_instance(humaneval.eval_fn.problem, runner=box, limits=LIMITS)
    replies = [
        fenced("def similar_elements(a, b):\n    return set(a) & set(b)"),
        fenced("def similar_elements(a, b):\n    return {4, 5}"),  # passes the first assert only
        fenced("def total(xs: List[int]) -> int:\n    return sum(xs)"),  # List comes from the prompt's imports
        fenced("def total(xs):\n    return sum(xs) + 1"),
    ]
    assert Correctness()(replies, [mbpp, mbpp, humaneval, humaneval]) == [1.0, 0.5, 1.0, 0.0]


def test_from_dataset_rejects_rows_of_neither_style():
    with pytest.raises(ValueError, match=r"row 0: expected MBPP-style columns .* got \['answer', 'question'\]"):
        code.from_dataset(datasets.Dataset.from_list([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="row 0: an MBPP-style row needs a non-empty 'text' or 'prompt'"):
        code.from_dataset(datasets.Dataset.from_list([{"text": " ", "test_list": ["assert True"]}]))
