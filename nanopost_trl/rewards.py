"""Reward functions: `Correctness` (the default), `Format`, `LengthPenalty` and their weighted `Combined` sum.

A RewardFn returns one float per completion, or NaN for a completion it could not score (its grader raised or ran
past its time limit); the trainer turns NaN into 0.0 and logs the count as `reward_errors`. `safe_grade` is the
per-completion guard: it never lets a grader crash or hang the run, and counts what it caught in `grader_stats`.

Timeout mechanism: in the main thread, `signal.setitimer(ITIMER_REAL)` + a SIGALRM handler that raises
`GraderTimeout`, which interrupts a hung pure-Python grader (a loop, a `time.sleep`, sympy) at its next bytecode.
`GraderTimeout` derives from BaseException so a grader's own `except Exception` cannot swallow it. An exception
raised inside a finalizer (`__del__`) is swallowed by the interpreter, so the cyclic garbage collector is paused
while a grader runs (its finalizers, e.g. of objects a training step left behind, would otherwise run mid-grader),
and the alarm repeats every `ALARM_REPEAT_S` until the grader has stopped. Signals only
work in the main thread, so elsewhere (or on platforms without setitimer) the grader runs in a daemon worker
thread joined with the time limit; on timeout `GraderTimeout` is injected into the worker with
`PyThreadState_SetAsyncExc`, which stops pure-Python code; a grader stuck inside one C call is left to finish in
the background. While it runs, `safe_grade` owns SIGALRM: graders must not set their own alarms (the `math` grader
turns math-verify's off for this reason).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import gc
import math
import re
import signal
import threading
from collections.abc import Callable

from nanopost_trl.base import RewardFn, TaskInstance

DEFAULT_TIMEOUT_S = 5.0
ALARM_REPEAT_S = 0.05

# Graders caught by safe_grade since the trainer last read and cleared this: keys "errors" and "timeouts".
grader_stats: collections.Counter[str] = collections.Counter()


class GraderTimeout(BaseException):
    """Raised inside a grader that ran past its time limit (a BaseException, so `except Exception` lets it pass)."""


def _raise_timeout(signum: int, frame: object) -> None:
    raise GraderTimeout


def _call_with_alarm(eval_fn: Callable[[str], float], completion: str, timeout_s: float) -> float:
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    collecting = gc.isenabled()
    gc.disable()
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, ALARM_REPEAT_S)
        return eval_fn(completion)
    finally:  # disarm first (a late alarm landing here is caught and the disarm retried), then restore the handler
        while True:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except GraderTimeout:
                continue
        signal.signal(signal.SIGALRM, previous)
        if collecting:
            gc.enable()


def _call_in_worker(eval_fn: Callable[[str], float], completion: str, timeout_s: float) -> float:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["score"] = eval_fn(completion)
        except BaseException as error:  # noqa: B036 -- handed back to the caller's thread below
            outcome["error"] = error

    worker = threading.Thread(target=run, name="nanopost-grader", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(GraderTimeout))
        raise GraderTimeout
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["score"]  # type: ignore[return-value]


def safe_grade(eval_fn: Callable[[str], float], completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """`float(eval_fn(completion))`, or NaN if the grader raised or ran past `timeout_s` seconds (counted in
    `grader_stats["errors"]` / `grader_stats["timeouts"]`)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    in_main_thread = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    call = _call_with_alarm if in_main_thread else _call_in_worker
    try:
        return float(call(eval_fn, completion, timeout_s))
    except GraderTimeout:
        grader_stats["timeouts"] += 1
    except Exception:
        grader_stats["errors"] += 1
    return math.nan


@dataclasses.dataclass
class Correctness(RewardFn):
    """The task's own grader, `instance.eval_fn(completion)`, each call guarded by `safe_grade`."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    name: str = "correctness"

    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        return [
            safe_grade(instance.eval_fn, completion, self.timeout_s)
            for completion, instance in zip(completions, instances, strict=True)
        ]


@dataclasses.dataclass
class Format(RewardFn):
    """1.0 if the regex `pattern` is found in the completion (`re.search`, `.` matches newlines), else 0.0.
    Anchor it with `^...$` to require the whole completion to match. Each search runs under `safe_grade`, so a
    pattern that backtracks catastrophically on some completion scores NaN instead of stalling the run."""

    pattern: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    name: str = "format"

    def __post_init__(self) -> None:
        self._regex = re.compile(self.pattern, re.DOTALL)

    def matches(self, completion: str) -> float:
        return float(self._regex.search(completion) is not None)

    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        return [safe_grade(self.matches, completion, self.timeout_s) for completion in completions]


@dataclasses.dataclass
class LengthPenalty(RewardFn):
    """DAPO's soft overlong penalty, in characters: 0 up to `max_chars - buffer_chars`, then falling linearly to -1
    at `max_chars`, and -1 beyond. Scale it with its weight in `Combined`."""

    max_chars: int = 4000
    buffer_chars: int = 1000
    name: str = "length_penalty"

    def __post_init__(self) -> None:
        if not 0 < self.buffer_chars <= self.max_chars:
            raise ValueError(f"need 0 < buffer_chars <= max_chars, got {self.buffer_chars} and {self.max_chars}")

    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        start = self.max_chars - self.buffer_chars
        return [-min(1.0, max(0, len(completion) - start) / self.buffer_chars) for completion in completions]


@dataclasses.dataclass
class Combined(RewardFn):
    """A weighted sum of named rewards: `Combined([(Correctness(), 1.0), (Format(r"\\boxed\\{"), 0.1)])`.

    The trainer hands each component to TRL as its own reward function with its weight, so each is logged as
    `reward_{name}_mean`; names must therefore be distinct. Calling it directly gives the same sum as TRL: a
    component's NaN contributes nothing, and the result is NaN only when every component is NaN.
    """

    components: list[tuple[RewardFn, float]]
    name: str = "combined"

    def __post_init__(self) -> None:
        self.components = [(reward_fn, float(weight)) for reward_fn, weight in self.components]
        if not self.components:
            raise ValueError("Combined needs at least one (RewardFn, weight) component")
        for reward_fn, weight in self.components:
            if not isinstance(reward_fn, RewardFn):
                raise TypeError(f"Combined components must be RewardFn instances, got {type(reward_fn).__name__}")
            if not math.isfinite(weight):
                raise ValueError(f"weight of {reward_fn.name!r} must be finite, got {weight}")
        names = [reward_fn.name for reward_fn, _ in self.components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Combined component names must be distinct (set `name=`); repeated: {duplicates}")

    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        columns = [reward_fn(completions, instances) for reward_fn, _ in self.components]
        weights = [weight for _, weight in self.components]
        totals = []
        for scores in zip(*columns, strict=True):
            scored = [(weight, score) for weight, score in zip(weights, scores, strict=True) if not math.isnan(score)]
            totals.append(sum(weight * score for weight, score in scored) if scored else math.nan)
        return totals
