"""Rewards: safe_grade's error/timeout guard (main thread and worker threads), Correctness, Format, LengthPenalty and
the weighted Combined sum. Adversarial completions through the real graders are in test_tasks.py."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time

import pytest

from nanopost_trl.base import TaskInstance
from nanopost_trl.rewards import (
    Combined,
    Correctness,
    Format,
    LengthPenalty,
    RewardAdapter,
    counting_graders,
    safe_grade,
)
from nanopost_trl.tasks import countdown
from nanopost_trl.tasks.graders import BOXED_PATTERN

TIMEOUT_S = 0.3


@pytest.fixture
def grader_stats():
    """What `safe_grade` caught during the test."""
    with counting_graders() as counts:
        yield counts


def spin_forever(completion: str) -> float:
    while True:
        pass


def sleep_forever(completion: str) -> float:
    time.sleep(3600)
    return 1.0


def swallow_exceptions_and_spin(completion: str) -> float:
    while True:
        with contextlib.suppress(Exception):  # a sloppy grader: the timeout must still get through
            time.sleep(3600)


class SlowFinalizer:
    def __del__(self) -> None:
        time.sleep(0.2)  # an alarm landing in here is swallowed by the interpreter ("Exception ignored in ...")


def finalizer_eats_the_alarm(completion: str) -> float:
    """A finalizer (as the garbage collector runs mid-grader) is running when the time limit passes; then it spins."""
    start = time.perf_counter()
    while time.perf_counter() < start + TIMEOUT_S - 0.05:
        pass
    SlowFinalizer()  # its __del__ spans the moment the first alarm fires
    while True:
        pass


def raise_error(completion: str) -> float:
    raise RuntimeError("grader bug")


def instance(eval_fn) -> TaskInstance:
    return TaskInstance(name="t", prompt="p", eval_fn=eval_fn)


def test_safe_grade_passes_scores_through(grader_stats):
    assert safe_grade(len, "abc", timeout_s=TIMEOUT_S) == 3.0
    assert isinstance(safe_grade(lambda c: True, "x"), float)
    assert grader_stats == {}


def test_safe_grade_counts_errors_as_nan(grader_stats):
    assert math.isnan(safe_grade(raise_error, "x"))
    assert math.isnan(safe_grade(lambda c: "not a number", "x"))
    assert grader_stats["errors"] == 2 and grader_stats["timeouts"] == 0
    with pytest.raises(ValueError, match="timeout_s"):
        safe_grade(len, "x", timeout_s=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("grader", [spin_forever, sleep_forever, swallow_exceptions_and_spin, finalizer_eats_the_alarm])
def test_safe_grade_interrupts_a_hung_grader(grader, grader_stats):
    handler = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    assert math.isnan(safe_grade(grader, "x", timeout_s=TIMEOUT_S))
    assert TIMEOUT_S <= time.perf_counter() - start < TIMEOUT_S + 1.0
    assert grader_stats["timeouts"] == 1 and grader_stats["errors"] == 0
    assert signal.getsignal(signal.SIGALRM) is handler  # the previous handler is back
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # and no alarm is left pending
    assert gc.isenabled()  # the garbage collector, paused while the grader ran, is back on
    assert safe_grade(len, "ab", timeout_s=TIMEOUT_S) == 2.0  # the next call works as usual


def test_safe_grade_outside_the_main_thread_interrupts_pure_python(grader_stats):
    results: list[float] = []
    before = set(threading.enumerate())
    caller = threading.Thread(
        target=lambda: results.extend(safe_grade(fn, "x", timeout_s=TIMEOUT_S) for fn in (spin_forever, len))
    )
    caller.start()
    caller.join(timeout=5)
    assert math.isnan(results[0]) and results[1] == 1.0
    assert grader_stats["timeouts"] == 1
    deadline = time.monotonic() + 2
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - before  # the runaway grader thread was stopped, not left spinning


def test_correctness_uses_each_instance_grader_and_reports_failures(grader_stats):
    instances = [instance(lambda c: float(c == "yes")), instance(raise_error), instance(spin_forever)]
    scores = Correctness(timeout_s=TIMEOUT_S)(["yes", "yes", "yes"], instances)
    assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[2])
    assert grader_stats == {"errors": 1, "timeouts": 1}
    assert Correctness()(["no"], instances[:1]) == [0.0]
    with pytest.raises(ValueError):
        Correctness()(["a", "b"], instances[:1])


def test_format_and_length_penalty():
    assert Format(BOXED_PATTERN)(["so \\boxed{4}", "so 4", "\\boxed{}", "\\boxed{\n4\n}"], []) == [1.0, 0.0, 0.0, 1.0]
    anchored = Format(r"^<think>.*</think>\s*<answer>.*</answer>$")
    completions = ["<think>a\nb</think> <answer>1</answer>", "<think>a</think> <answer>1</answer> extra"]
    assert anchored(completions, []) == [1.0, 0.0]
    penalty = LengthPenalty(max_chars=100, buffer_chars=20)
    assert penalty(["a" * n for n in (0, 80, 90, 100, 5000)], []) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer_chars"):
        LengthPenalty(max_chars=10, buffer_chars=20)


def test_format_patterns_are_linear_and_a_catastrophic_one_times_out(grader_stats):
    start = time.perf_counter()
    assert Format(countdown.ANSWER_PATTERN)(["<answer>" * 20_000, "so <answer>1 + 2</answer>"], []) == [0.0, 1.0]
    assert Format(BOXED_PATTERN)(["\\boxed{" * 20_000 + "x" * 100_000], []) == [1.0]
    assert time.perf_counter() - start < 1.0
    assert math.isnan(Format(r"(a+)+$", timeout_s=TIMEOUT_S)(["a" * 40 + "!"], [])[0])
    assert grader_stats["timeouts"] == 1


def test_combined_weighted_sum_and_components(grader_stats):
    correctness, fmt = Correctness(), Format(BOXED_PATTERN)
    combined = Combined([(correctness, 1), (fmt, 0.5)])
    assert combined.components == [(correctness, 1.0), (fmt, 0.5)]
    assert [reward_fn.name for reward_fn, _ in combined.components] == ["correctness", "format"]
    instances = [instance(lambda c: float("4" in c)), instance(raise_error), instance(raise_error)]
    # right and boxed; grader failed but boxed (the NaN adds nothing, as in the trainer); grader failed, not boxed
    assert combined(["\\boxed{4}", "\\boxed{5}", "5"], instances) == [1.5, 0.5, 0.0]
    assert grader_stats["errors"] == 2


def test_combined_nan_only_when_every_component_failed():
    scores = Combined([(Correctness(), 1.0), (Correctness(name="again"), 2.0)])(["x"], [instance(raise_error)])
    assert math.isnan(scores[0])


def test_combined_rejects_bad_components():
    with pytest.raises(ValueError, match="repeated: \\['format'\\]"):
        Combined([(Format("a"), 1.0), (Format("b"), 1.0)])
    assert Combined([(Format("a"), 1.0), (Format("b", name="format_b"), 1.0)])(["ab"], []) == [2.0]
    with pytest.raises(ValueError, match="at least one"):
        Combined([])
    with pytest.raises(TypeError, match="RewardFn"):
        Combined([(len, 1.0)])
    with pytest.raises(ValueError, match="finite"):
        Combined([(Correctness(), math.inf)])


def test_graders_outside_a_training_reward_call_do_not_feed_its_counts():
    """The held-out eval grades with `safe_grade` outside any reward call: its time-outs are not training's."""
    adapter = RewardAdapter(Correctness(timeout_s=TIMEOUT_S), [instance(spin_forever)])
    assert math.isnan(safe_grade(spin_forever, "x", timeout_s=TIMEOUT_S))  # as the eval would
    assert adapter.take_counts() == (0, 0)
    assert adapter(["p"], ["x"], [0]) == [0.0]
    assert adapter.take_counts() == (1, 1) and adapter.take_counts() == (0, 0)  # 1 NaN score, from 1 time-out
