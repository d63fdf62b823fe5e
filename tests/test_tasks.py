"""Tasks and graders: GSM8K / MATH through the real `datasets` loader on fixture files, countdown's generator and safe
evaluator, `from_dataset`, and grader tables (including adversarial completions)."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from fractions import Fraction

import datasets
import pandas as pd
import pytest

from nanopost_trl.base import TaskInstance
from nanopost_trl.rewards import counting_graders, safe_grade
from nanopost_trl.tasks import countdown, from_dataset, get_task_loader, gsm8k, resolve_tasks, tasks_label
from nanopost_trl.tasks import math as math_task
from nanopost_trl.tasks.custom import HubDataUnavailable
from nanopost_trl.tasks.graders import (
    BOXED_INSTRUCTION,
    extract_number,
    grade_exact,
    grade_math,
    grade_numeric,
    last_boxed,
    require_math_verify,
)

GSM8K_ROWS = [
    {"question": "Ann has 1,200 pens and buys 34 more. How many pens?", "answer": "1200+34=1234\n#### 1,234"},
    {"question": "A debt of 5 dollars is written how?", "answer": "It is negative.\n#### -5"},
    {"question": "What is 3 divided by 4?", "answer": "3/4=0.75\n#### 0.75"},
]
MATH_ROWS = [
    {"problem": "What is $1/2$?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Expand $(x+1)^2$.", "solution": "We get $\\boxed{x^2+2x+1}$.", "level": "Level 2", "type": "Algebra"},
]
# Completions that try to crash, hang or run code. `{pwned}` becomes a path that must never be created.
ADVERSARIAL = [
    "9" * 100_000,
    "1e999999",
    "#### 1e999999",
    "(" * 10_000 + "1" + ")" * 10_000,
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "\\boxed{" * 10_000,
    "\u0663\u0664",  # Arabic-Indic digits 3, 4
    "\\boxed{\u0663\u0664}",
    "x" * 100_000,
    "#### " + "9" * 5_000,
    "1/" * 20_000 + "0",
    "\\boxed{9^{9^{9^{9}}}}",
    "<answer>9 ** 9 ** 9 ** 9</answer>",
    "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "<answer>__import__('os').system('touch {pwned}')</answer>",
    "\\boxed{__import__('os').system('touch {pwned}')}",
]


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def user_text(instance) -> str:
    (message,) = instance.prompt
    assert message["role"] == "user"
    return message["content"]


# --- GSM8K


@pytest.fixture
def gsm8k_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:1])
    return tmp_path


def test_gsm8k_loads_jsonl_through_datasets(gsm8k_dir):
    train = gsm8k.load("train", data_dir=str(gsm8k_dir))
    assert [instance.name for instance in train] == ["gsm8k"] * 3
    assert user_text(train[0]).startswith(GSM8K_ROWS[0]["question"])
    assert user_text(train[0]).endswith(BOXED_INSTRUCTION)
    assert [instance.eval_fn("\\boxed{1234}") for instance in train] == [1.0, 0.0, 0.0]
    assert train[1].eval_fn("So the answer is #### -5") == 1.0
    assert train[2].eval_fn("\\boxed{\\frac{3}{4}}") == 1.0
    assert len(gsm8k.load("test", data_dir=str(gsm8k_dir))) == 1


def test_gsm8k_loads_hub_parquet_layout_from_env_var(tmp_path, monkeypatch):
    (tmp_path / "main").mkdir()
    pd.DataFrame(GSM8K_ROWS).to_parquet(tmp_path / "main" / "test-00000-of-00001.parquet")
    pd.DataFrame(GSM8K_ROWS[:1]).to_parquet(tmp_path / "main" / "train-00000-of-00001.parquet")
    monkeypatch.setenv(gsm8k.ENV_VAR, str(tmp_path))
    test = get_task_loader("gsm8k")("test")
    assert len(test) == 3 and test[1].eval_fn("#### -5") == 1.0
    assert len(resolve_tasks(["gsm8k", "countdown"], "test")) == 3 + countdown.SIZES["test"]


def test_gsm8k_rejects_bad_data(gsm8k_dir, tmp_path):
    with pytest.raises(ValueError, match="splits"):
        gsm8k.load("validation", data_dir=str(gsm8k_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'test' files"):
        gsm8k.load("test", data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gsm8k.load("test", data_dir=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    write_jsonl(bad / "train.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="row 1: column 'answer'"):
        gsm8k.load("train", data_dir=str(bad))
    write_jsonl(bad / "test.jsonl", [GSM8K_ROWS[0], GSM8K_ROWS[1], {"question": "", "answer": "#### 3"}])
    with pytest.raises(ValueError, match="row 2: empty"):
        gsm8k.load("test", data_dir=str(bad))


# --- numeric / exact graders

NUMERIC_CASES = [
    # (completion, reference answer, score)
    ("The answer is 42.", "42", 1.0),
    ("The answer is 42.", "43", 0.0),
    ("#### 1,234", "1234", 1.0),
    ("She pays $1,234.00 in total.", "1234", 1.0),
    ("1,000,000 grains", "1000000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("It rose by 50%.", "50", 1.0),
    ("\\boxed{72.0}", "72", 1.0),
    ("#### 72.50", "72.5", 1.0),
    ("#### -5", "-5", 1.0),
    ("#### -5", "5", 0.0),
    ("the result is \u22125", "-5", 1.0),  # unicode minus sign
    ("3/4", "0.75", 1.0),
    ("0.75", "3/4", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("0.33", "1/3", 0.0),
    ("#### 5\nThen I double-check: 6", "5", 1.0),  # the marker beats the last number
    ("#### 5, though \\boxed{6}", "5", 1.0),  # ... and beats \boxed
    ("Maybe 5? No: \\boxed{7}. Check: 7 - 2 = 5", "7", 1.0),  # \boxed beats the last number
    ("First 3 apples, then 4 apples", "4", 1.0),  # last-number fallback
    ("\\boxed{x = 12}", "12", 1.0),
    ("no digits at all", "1", 0.0),
    ("#### 5/0", "5", 0.0),
    ("\u0663\u0664", "34", 0.0),  # non-ASCII digits are not read as numbers
    ("A list: 1,2,3", "3", 1.0),
]


@pytest.mark.parametrize(("completion", "answer", "score"), NUMERIC_CASES)
def test_numeric_grader(completion, answer, score):
    assert grade_numeric(completion, answer) == score


def test_extract_number_and_last_boxed():
    assert extract_number("#### 1,234.50") == Fraction(2469, 2)
    assert extract_number("nothing") is None
    assert extract_number("9" * 200) is None  # too long to be an answer
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    with pytest.raises(ValueError, match="not a number"):
        grade_numeric("1", "many")


EXACT_CASES = [
    ("#### Paris", "Paris", 1.0),
    ("The capital is\n#### Paris \nDone.", "Paris", 1.0),
    ("\\boxed{B}", "B", 1.0),
    ("\\boxed{b}", "B", 0.0),
    ("Thinking...\nB\n\n", "B", 1.0),
    ("Thinking...\nB is it", "B", 0.0),
    ("", "B", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "score"), EXACT_CASES)
def test_exact_grader(completion, answer, score):
    assert grade_exact(completion, answer) == score


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_fast_graders_survive_adversarial_completions(completion, tmp_path):
    pwned = tmp_path / "pwned"
    completion = completion.replace("{pwned}", str(pwned))
    start = time.perf_counter()
    scores = [grade_numeric(completion, "34"), grade_exact(completion, "34"), countdown.grade(completion, (30, 4), 34)]
    assert time.perf_counter() - start < 2.0
    assert scores == [0.0, 0.0, 0.0]
    assert not pwned.exists()


# --- countdown


@pytest.fixture(scope="module")
def countdown_splits():
    return countdown.problems("train"), countdown.problems("test")


def test_countdown_is_solvable_disjoint_and_deterministic(countdown_splits):
    train, test = countdown_splits
    assert len(test) == countdown.SIZES["test"] and len(train) > 0.99 * countdown.SIZES["train"]
    for problem in train[:500] + test:
        assert countdown.evaluate(problem.solution, problem.numbers) == problem.target
        assert 3 <= len(problem.numbers) <= 4 and all(1 <= n <= 99 for n in problem.numbers)
    train_keys = {(tuple(sorted(p.numbers)), p.target) for p in train}
    assert not train_keys & {(tuple(sorted(p.numbers)), p.target) for p in test}
    assert countdown.problems("test") == test
    with pytest.raises(ValueError, match="splits"):
        countdown.problems("dev")


def test_countdown_instances_grade_their_own_solution():
    instances = countdown.load("test")
    problem = countdown.problems("test")[0]
    assert str(problem.target) in user_text(instances[0]) and "<answer>" in user_text(instances[0])
    assert instances[0].eval_fn(f"Let me think.\n<answer>{problem.solution}</answer>") == 1.0
    assert instances[0].eval_fn(f"<answer>{problem.solution} = {problem.target}</answer>") == 1.0
    assert instances[0].eval_fn(problem.solution) == 0.0  # no answer tags
    assert instances[0].eval_fn(f"<answer>{problem.solution}</answer> or <answer>1</answer>") == 0.0  # last one counts


EQUATIONS = [
    # (equation, numbers, value or None if rejected)
    ("(1 + 2) * 3", (1, 2, 3), Fraction(9)),
    ("  6 / 4 * 2 ", (2, 4, 6), Fraction(3)),  # exact fractions, no float error
    ("3 / 4", (3, 4), Fraction(3, 4)),
    ("10 - 2 - 3", (2, 3, 10), Fraction(5)),
    ("44 + 19", (19, 35, 44, 71), Fraction(63)),  # not every number must be used
    ("2 + 2", (2, 3), None),  # a number used twice
    ("2 + 2", (2, 2), Fraction(4)),  # ... unless it is given twice
    ("5 + 1", (1, 2), None),  # a number not given
    ("2 ** 3", (2, 3), None),
    ("-2 + 3", (2, 3), None),  # unary minus
    ("2.0 + 3", (2, 3), None),
    ("True + 3", (1, 3), None),
    ("2 // 3", (2, 3), None),
    ("2 % 3", (2, 3), None),
    ("(2 < 3)", (2, 3), None),
    ("[2, 3][0]", (2, 3), None),
    ("__import__('os').getcwd()", (2, 3), None),
    ("(lambda: 3)()", (3,), None),
    ("x + 3", (3,), None),
    ("3 / (2 - 2)", (2, 2, 3), None),  # division by zero
    ("2 +", (2,), None),
    ("", (2,), None),
    ("1e999999", (1,), None),
    ("(" * 10_000 + "1" + ")" * 10_000, (1,), None),
]


@pytest.mark.parametrize(("equation", "numbers", "value"), EQUATIONS)
def test_countdown_evaluator(equation, numbers, value):
    assert countdown.evaluate(equation, numbers) == value


# --- MATH (math-verify)


def test_math_grader_names_the_extra_when_math_verify_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'nanopost_trl\[math\]'"):
        require_math_verify()
    with pytest.raises(ImportError, match="math-verify"):
        from_dataset(datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}]), grader="math")


@pytest.fixture
def math_verify():
    return pytest.importorskip("math_verify", reason="math-verify not installed: pip install 'nanopost_trl[math]'")


MATH_CASES = [
    ("So $\\boxed{0.5}$.", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0),
    ("\\boxed{\\sqrt{9}}", "3", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{x^2+1}", "x^2+2x+1", 0.0),
    ("The answer is one half.", "\\frac{1}{2}", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "score"), MATH_CASES)
def test_math_grader(math_verify, completion, answer, score):
    assert grade_math(completion, answer) == score


def test_math_loads_parquet_layout_through_datasets(math_verify, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    pd.DataFrame(MATH_ROWS).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    monkeypatch.setenv(math_task.ENV_VAR, str(tmp_path))
    test = math_task.load("test")
    assert [instance.name for instance in test] == ["math", "math"]
    assert user_text(test[1]).startswith("Expand") and user_text(test[1]).endswith(BOXED_INSTRUCTION)
    assert test[0].eval_fn("Half is $\\boxed{0.5}$") == 1.0
    assert test[1].eval_fn("\\boxed{(x+1)^2}") == 1.0
    assert test[1].eval_fn("\\boxed{(x+1)^3}") == 0.0


def test_math_prefers_answer_column_and_rejects_missing_answers(math_verify, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "solution": "\\boxed{1}", "answer": "2"}])
    (instance,) = math_task.load("train", data_dir=str(tmp_path))
    assert instance.eval_fn("\\boxed{2}") == 1.0
    write_jsonl(tmp_path / "test.jsonl", [MATH_ROWS[0], {"problem": "p", "solution": "no box here"}])
    with pytest.raises(ValueError, match="math row 1"):
        math_task.load("test", data_dir=str(tmp_path))


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_math_grader_under_safe_grade_survives_adversarial_completions(math_verify, completion, tmp_path):
    pwned = tmp_path / "pwned"
    start = time.perf_counter()
    with counting_graders() as grader_stats:
        score = safe_grade(functools.partial(grade_math, answer="34"), completion.replace("{pwned}", str(pwned)), 1.0)
    assert time.perf_counter() - start < 2.0
    assert score == 0.0 or (math.isnan(score) and grader_stats["timeouts"] + grader_stats["errors"] == 1)
    assert not pwned.exists()


# --- from_dataset


def test_from_dataset_sources(tmp_path):
    rows = [{"q": "What is 2+2?", "a": 4}, {"q": [{"role": "user", "content": "Half of 3?"}], "a": "3/2"}]
    write_jsonl(tmp_path / "rows.jsonl", rows[:1])
    pd.DataFrame(rows[:1]).to_parquet(tmp_path / "rows.parquet")
    for source in (tmp_path / "rows.jsonl", str(tmp_path / "rows.parquet"), datasets.Dataset.from_list(rows[:1])):
        (instance,) = from_dataset(source, prompt_column="q", answer_column="a", name="mine")
        assert instance.name == "mine" and instance.prompt == [{"role": "user", "content": "What is 2+2?"}]
        assert instance.eval_fn("\\boxed{4}") == 1.0 and instance.eval_fn("5") == 0.0
    (tmp_path / "rows.json").write_text(json.dumps(rows[1:]))
    (chat,) = from_dataset(tmp_path / "rows.json", prompt_column="q", answer_column="a")
    assert chat.prompt == rows[1]["q"] and chat.eval_fn("1.5") == 1.0


def test_from_dataset_graders():
    dataset = datasets.Dataset.from_list([{"prompt": "Capital of France?", "answer": "Paris"}])
    (instance,) = from_dataset(dataset, grader="exact")
    assert instance.eval_fn("#### Paris") == 1.0 and instance.eval_fn("#### Lyon") == 0.0
    seen = []

    def contains(completion: str, answer: str) -> float:
        seen.append(answer)
        return float(answer.lower() in completion.lower())

    (instance,) = from_dataset(dataset, grader=contains)
    assert instance.eval_fn("it is paris") == 1.0 and seen == ["Paris"]
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        from_dataset(dataset, grader="fuzzy")


@pytest.mark.parametrize(
    ("second_row", "message"),
    [
        ({"prompt": "q", "solution": "1"}, "row 1: answer is None in column 'answer'"),
        ({"prompt": "  ", "answer": "2"}, "row 1: empty or invalid prompt in 'prompt'"),
        ({"prompt": None, "answer": "2"}, "row 1: empty or invalid prompt in 'prompt'"),
        ({"prompt": "q", "answer": None}, "row 1: answer is None in column 'answer'"),
        ({"prompt": "q", "answer": "lots"}, "row 1: answer 'lots' in column 'answer' is not a number"),
    ],
)
def test_from_dataset_rejects_malformed_rows(second_row, message):
    with pytest.raises(ValueError, match=message):
        from_dataset(datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}, second_row]))
    with pytest.raises(ValueError, match="row 0: no column 'label'"):
        from_dataset(datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}]), answer_column="label")


def test_from_dataset_jsonl_row_missing_a_key_names_the_row(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "answer": 1}, {"prompt": "q"}])
    with pytest.raises(ValueError, match="row 1: answer is None"):
        from_dataset(tmp_path / "rows.jsonl")


def test_runs_are_labelled_by_their_task_names_and_custom_only_for_instances():
    assert tasks_label("addition") == "addition"
    assert tasks_label(["addition"]) == "addition"  # the CLI passes a list of names
    assert tasks_label(["gsm8k", "math"]) == "gsm8k+math"
    assert tasks_label([TaskInstance(name="mine", prompt="1+1?", eval_fn=lambda completion: 0.0)]) == "custom"


def test_from_dataset_with_an_unreachable_hub_id_says_to_pass_local_files(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubDataUnavailable, match=r"could not load the dataset 'someone/answers' .*local \.jsonl"):
        from_dataset("someone/answers")
