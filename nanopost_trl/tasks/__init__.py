"""Task registry. A task is a module-level `load(split, data_dir=None) -> list[TaskInstance]` registered by name.

`resolve_tasks("gsm8k", "train")`, `resolve_tasks(["addition", "countdown"], "test")` or a list of TaskInstance
(returned as is) give the instances a run trains or evaluates on.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.custom import from_dataset as from_dataset  # re-exported: tasks from your own data


class TaskLoader(Protocol):
    def __call__(self, split: str, data_dir: str | None = None) -> list[TaskInstance]: ...


# name -> module under nanopost_trl.tasks defining `load`; imported on first use so optional deps stay optional.
TASK_MODULES: dict[str, str] = {
    "addition": "addition",
    "arithmetic": "arithmetic",
    "code": "code",
    "countdown": "countdown",
    "gsm8k": "gsm8k",
    "math": "math",
    "multiplication": "multiplication",
}


def task_names() -> list[str]:
    return sorted(TASK_MODULES)


def _task_module(name: str) -> ModuleType:
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(task_names())}")
    return importlib.import_module(f"nanopost_trl.tasks.{TASK_MODULES[name]}")


def get_task_loader(name: str) -> TaskLoader:
    return _task_module(name).load


def task_source(name: str) -> str:
    """Where a task's data comes from, in a few words (each task module's `SOURCE`)."""
    return _task_module(name).SOURCE


def tasks_label(tasks: str | Sequence[str] | Sequence[TaskInstance]) -> str:
    """The tasks as a run-name part: "addition", "gsm8k+math"; "custom" for a list of TaskInstance."""
    if isinstance(tasks, str):
        return tasks
    return "+".join(tasks) if all(isinstance(task, str) for task in tasks) else "custom"


def resolve_tasks(
    tasks: str | Sequence[str] | Sequence[TaskInstance], split: str, data_dir: str | None = None
) -> list[TaskInstance]:
    """Instances for a task name, a list of names, or a list of TaskInstance (returned unchanged)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("no tasks given: pass a task name, a list of names, or a list of TaskInstance")
    if all(isinstance(task, TaskInstance) for task in tasks):
        return list(tasks)
    if not all(isinstance(task, str) for task in tasks):
        raise TypeError("tasks must be a name, a list of names, or a list of TaskInstance, not a mix")
    return [instance for name in tasks for instance in get_task_loader(name)(split, data_dir=data_dir)]
