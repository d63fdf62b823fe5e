"""Tools: the tool calls of multi-turn episodes, run by TRL's own tool loop (GRPOTrainer's `tools`,
`environment_factory`, `max_tool_calling_iterations`) in training and in the held-out evaluation, each call guarded.

- `run_tools(instances)`: the one set of tools / environment factory a run hands TRL.
- `guarded(tool, counts, timeout_s)` / `guarded_environments(factory, ...)`: a tool (or an environment's tool method)
  whose exception or time-out becomes the tool's result, so the episode goes on and is scored. TRL's
  loop turns the raised error into the tool message `{'error': '...'}` and counts it in `tools/failure_frequency`;
  `counts` tells the kinds apart ("errors", "timeouts"); a result that is not a str is rendered by TRL, as TRL does.
  Async tools stay async (TRL awaits them, under `asyncio.wait_for`). The time limit is `timeouts.call_with_timeout`'s.
- `dropped_tool_results`, `episode_stats`: what a step's episodes did with their tools (logged).

Safety: a tool runs in this process with the arguments the model wrote. Treat them as untrusted input: parse them,
never `eval` or `exec` them, and never hand them to a shell (the built-in `calculator` parses two numbers and one
operator). The time limit interrupts pure-Python code only; a tool stuck inside one C call is not stopped.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from nanopost_trl.base import TaskInstance
from nanopost_trl.timeouts import GraderTimeout, call_with_timeout

DEFAULT_TOOL_TIMEOUT_S = 10.0
NOT_TOOLS = ("reset", "get_reward")  # an environment's public methods that TRL does not offer the model


class ToolTimeout(Exception):
    """A tool ran past its time limit (an Exception, so TRL's tool loop turns it into the tool's result)."""


def run_tools(instances: Sequence[TaskInstance]) -> tuple[list[Callable], Callable | None]:
    """The tools and environment factory of a run's training instances: TRL's loop offers one set per run."""
    kinds = {(instance.tools, instance.environment_factory) for instance in instances}
    if len(kinds) > 1:
        raise ValueError(
            f"the training tasks carry {len(kinds)} different sets of tools / environment factories, but TRL's tool "
            "loop offers one set per run: train tasks with the same tools together (tasks without tools apart)"
        )
    tools, factory = kinds.pop()
    return list(tools), factory


def guarded_call(function: Callable[[], Any], name: str, counts: collections.Counter[str], timeout_s: float) -> Any:
    """`function()` within `timeout_s`; else raise, counting the kind of failure ("errors", "timeouts") in `counts`
    (and every call in "executed"). A result that is not a str is TRL's to render (`str(result)`, or a list of
    content blocks as they are)."""
    counts["executed"] += 1
    try:
        return call_with_timeout(function, timeout_s)
    except GraderTimeout:
        counts["timeouts"] += 1
        raise ToolTimeout(f"tool {name} ran past its {timeout_s:g} s time limit") from None
    except Exception:
        counts["errors"] += 1
        raise


async def guarded_await(call: Callable[[], Any], name: str, counts: collections.Counter[str], timeout_s: float) -> Any:
    """An async tool's `await call()` within `timeout_s` (TRL awaits it on its loop), counted as `guarded_call`."""
    counts["executed"] += 1
    try:
        return await asyncio.wait_for(call(), timeout_s)
    except asyncio.TimeoutError:
        counts["timeouts"] += 1
        raise ToolTimeout(f"tool {name} ran past its {timeout_s:g} s time limit") from None
    except Exception:
        counts["errors"] += 1
        raise


def guarded(tool: Callable[..., Any], counts: collections.Counter[str], timeout_s: float) -> Callable[..., Any]:
    """`tool` under `guarded_call` (an async tool: `guarded_await`, still async, so TRL awaits it), with its name,
    signature and docstring (TRL renders its schema from them). Of a method, the instance passes through."""
    if not inspect.isfunction(tool) and not inspect.ismethod(tool):
        raise TypeError(f"a tool must be a function with type hints and a docstring, got {type(tool).__name__}")
    name = tool.__name__
    if inspect.iscoroutinefunction(tool):

        @functools.wraps(tool)
        async def call_async(*instance: Any, **arguments: Any) -> Any:
            return await guarded_await(functools.partial(tool, *instance, **arguments), name, counts, timeout_s)

        return call_async

    @functools.wraps(tool)
    def call(*instance: Any, **arguments: Any) -> Any:
        return guarded_call(functools.partial(tool, *instance, **arguments), name, counts, timeout_s)

    return call


def guarded_environments(
    factory: Callable[[], Any], counts: collections.Counter[str], timeout_s: float
) -> Callable[[], Any]:
    """`factory`, making environments whose tool methods run `guarded` (one subclass per environment class, so TRL's
    `get_reward` column, matched by exact type, still finds every instance)."""
    subclasses: dict[type, type] = {}

    def make() -> Any:
        environment = factory()
        cls = type(environment)
        if cls not in subclasses:
            methods = {name: guarded(method, counts, timeout_s) for name, method in tool_methods(cls)}
            subclasses[cls] = type(cls.__name__, (cls,), {**methods, "__qualname__": cls.__qualname__})
        environment.__class__ = subclasses[cls]
        return environment

    return make


def guarded_tool_loop(
    tools: Sequence[Callable] | None,
    environment_factory: Callable | dict[str, Callable] | None,
    counts: collections.Counter[str],
    timeout_s: float,
) -> dict[str, Any]:
    """GRPOTrainer's `tools` and `environment_factory` arguments (one factory, or TRL's dict of one per environment
    name), every tool call guarded and counted in `counts`."""
    arguments: dict[str, Any] = {"tools": [guarded(tool, counts, timeout_s) for tool in tools or ()] or None}
    if isinstance(environment_factory, dict):
        arguments["environment_factory"] = {
            name: guarded_environments(factory, counts, timeout_s) for name, factory in environment_factory.items()
        }
    elif environment_factory is not None:
        arguments["environment_factory"] = guarded_environments(environment_factory, counts, timeout_s)
    return arguments


def dropped_tool_results(executed: int, episodes: Sequence[Sequence[dict[str, Any]]]) -> int:
    """How many of the `executed` tool calls have no result in the `episodes`: TRL rolls a round's results back when
    they would push the episode past `max_completion_length` (or the model's context), without a counter."""
    results = sum(message["role"] == "tool" for episode in episodes for message in episode)
    return max(executed - results, 0)


def tool_methods(cls: type) -> list[tuple[str, Callable]]:
    """The methods of an environment class that TRL offers the model as tools (public, not reset/get_reward)."""
    return [
        (name, method)
        for name, method in inspect.getmembers(cls, predicate=inspect.isfunction)
        if not name.startswith("_") and name not in NOT_TOOLS
    ]


def environment_tools(environment: Any) -> list[Callable]:
    """An environment instance's bound tool methods."""
    return [getattr(environment, name) for name, _ in tool_methods(type(environment))]


def episode_stats(episodes: Sequence[Sequence[dict[str, Any]]], marker: str | None) -> dict[str, float]:
    """Per-episode means: assistant turns, parsed tool calls, and malformed calls (an assistant turn that opens a
    tool call, `marker`, but parsed to none: TRL then keeps it as plain text)."""
    replies = [[message for message in episode if message["role"] == "assistant"] for episode in episodes]
    turns = [len(episode) for episode in replies]
    calls = [sum(len(message.get("tool_calls") or []) for message in episode) for episode in replies]
    malformed = [
        sum(bool(marker) and not message.get("tool_calls") and marker in message["content"] for message in episode)
        for episode in replies
    ]
    count = max(len(episodes), 1)
    return {
        "tool_turns_mean": sum(turns) / count,
        "tool_calls_mean": sum(calls) / count,
        "tool_calls_malformed_mean": sum(malformed) / count,
    }
