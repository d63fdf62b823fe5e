"""Reward functions: `Correctness` (the default), `Format`, `LengthPenalty` and their weighted `Combined` sum.

A RewardFn returns one float per completion, or NaN for a completion it could not score (its grader raised or ran
past its time limit); the trainer turns NaN into 0.0 and logs the count as `reward_errors`. `safe_grade` is the
per-completion guard: it never lets a grader crash or hang the run (the time limit is
`timeouts.call_with_timeout`'s), and counts what it caught in the innermost
`counting_graders()` block (training's reward calls run in one; the held-out evaluation's do not, so an eval time-out
never shows up in a training step's `reward_timeouts`). A grader counts events of its own there with
`count_grader_event` (the code task: how each program ended, `sandbox_*`), which `RewardAdapter` logs through TRL's
`log_metric`. `RewardAdapter` hands a RewardFn to TRL.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nanopost_trl.base import RewardFn, TaskInstance
from nanopost_trl.timeouts import GraderTimeout, call_with_timeout, check_timeout
from nanopost_trl.utils import text_of

DEFAULT_TIMEOUT_S = 5.0
REWARD_FN_SIGNATURE = "reward_fn(completions: list[str], instances: list[TaskInstance]) -> list[float]"

# The counters of the open `counting_graders()` blocks, innermost last (any thread's graders count in it).
_grader_counts: list[collections.Counter[str]] = []


@contextlib.contextmanager
def counting_graders() -> Iterator[collections.Counter[str]]:
    """Count the graders `safe_grade` catches inside the block: a Counter with keys "errors" and "timeouts"."""
    counts: collections.Counter[str] = collections.Counter()
    _grader_counts.append(counts)
    try:
        yield counts
    finally:
        _grader_counts.remove(counts)


def count_grader_event(name: str, amount: float = 1.0) -> None:
    """Add `amount` to `name` in the innermost `counting_graders()` block; outside one, nothing counts it."""
    if _grader_counts:
        _grader_counts[-1][name] += amount


def safe_grade(eval_fn: Callable[[str], float], completion: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """`float(eval_fn(completion))`, or NaN if the grader raised or ran past `timeout_s` seconds (counted as
    "errors" / "timeouts" by the enclosing `counting_graders()`, if any)."""
    check_timeout(timeout_s)
    counts = _grader_counts[-1] if _grader_counts else collections.Counter()  # outside a block: nobody counts
    try:
        return float(call_with_timeout(functools.partial(eval_fn, completion), timeout_s))
    except GraderTimeout:
        counts["timeouts"] += 1
    except Exception:
        counts["errors"] += 1
    return math.nan


@dataclasses.dataclass
class Correctness(RewardFn):
    """The task's own grader, `instance.eval_fn(completion)`, each call guarded by `safe_grade`.

    An eval_fn with a `prefetch(completion)` method (the code task's: it starts the program in the sandbox) gets
    every completion first, so that such graders run in parallel; the guarded calls then collect the results.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    name: str = "correctness"

    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        for completion, instance in zip(completions, instances, strict=True):
            if hasattr(instance.eval_fn, "prefetch"):
                instance.eval_fn.prefetch(completion)
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


class RewardAdapter:
    """A TRL reward function (`f(prompts, completions, instance_id, **kwargs)`) around a nanopost `RewardFn`.

    The RewardFn gets each completion's final text (of a multi-turn tool episode: the last assistant message's); one
    that declares a keyword `episodes=None` also gets each completion's messages (assistant turns with their parsed
    `tool_calls`, and the `tool` results), and one that declares `environments` the episode's environment instances.

    A grader that raises, or a score that is NaN/inf/not a number, scores 0.0 and is counted in `errors`; graders
    that ran past their time limit are counted in `timeouts` too. `take_counts()` reads and clears both. The other
    counts of `count_grader_event` during the call go to TRL's `log_metric` (its per-call value, averaged over calls
    and processes).
    """

    def __init__(self, reward_fn: Callable, instances: Sequence[TaskInstance]) -> None:
        check_reward_fn_signature(reward_fn)
        self.reward_fn = reward_fn
        self.instances = instances
        self.extra_arguments = [name for name in ("episodes", "environments") if accepts_keyword(reward_fn, name)]
        self.__name__ = getattr(reward_fn, "name", None) or getattr(reward_fn, "__name__", type(reward_fn).__name__)
        self.errors = 0
        self.timeouts = 0

    def __call__(self, prompts: list, completions: list, instance_id: list[int], **kwargs: Any) -> list[float]:
        texts = [text_of(c, role="assistant") for c in completions]
        batch = [self.instances[i] for i in instance_id]
        extra = {"episodes": [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]}
        extra["environments"] = kwargs.get("environments")
        with counting_graders() as counts:
            try:
                scores = list(self.reward_fn(texts, batch, **{k: extra[k] for k in self.extra_arguments}))
            except Exception as error:  # a crashed reward never kills the run
                warnings.warn(f"reward {self.__name__!r} raised {error!r}; scoring this batch 0", stacklevel=2)
                scores = [math.nan] * len(texts)
        self.timeouts += counts["timeouts"]
        if "log_metric" in kwargs:
            for name in sorted(counts.keys() - {"errors", "timeouts"}):
                kwargs["log_metric"](name, float(counts[name]))
        if len(scores) != len(texts):
            raise ValueError(f"reward {self.__name__!r} returned {len(scores)} scores for {len(texts)} completions")
        cleaned = [to_finite_score(score) for score in scores]
        self.errors += sum(score is None for score in cleaned)
        return [0.0 if score is None else score for score in cleaned]

    def take_counts(self) -> tuple[int, int]:
        """(errors, timeouts) since the last call."""
        counts = self.errors, self.timeouts
        self.errors = self.timeouts = 0
        return counts


def accepts_keyword(function: Callable, name: str) -> bool:
    """Whether `function` declares a parameter `name` (a bare `**kwargs` does not count)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def to_finite_score(score: Any) -> float | None:
    """The score as a float, or None if it is not a finite number."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_reward_fn_signature(reward_fn: Callable) -> None:
    """Fail at start-up, not mid-run, when a reward function cannot be called as `reward_fn(completions, instances)`."""
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as {REWARD_FN_SIGNATURE}; got {reward_fn!r}")
    try:
        inspect.signature(reward_fn).bind([], [])
    except TypeError as error:
        raise TypeError(
            f"reward_fn {reward_fn!r} has the wrong signature ({error}); expected {REWARD_FN_SIGNATURE}"
        ) from None
    except ValueError:  # builtins without a signature: trust them
        pass


def reward_components(reward_fn: Callable | None) -> list[tuple[Callable, float]]:
    """A `Combined` splits into its weighted components (each logged by TRL); else one component."""
    if reward_fn is None:
        return [(Correctness(), 1.0)]
    if isinstance(reward_fn, Combined):
        return list(reward_fn.components)
    return [(reward_fn, 1.0)]
