"""Time limits on user code that runs in the training process (graders, tools): `call_with_timeout`.

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

import ctypes
import gc
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

ALARM_REPEAT_S = 0.05
T = TypeVar("T")


class GraderTimeout(BaseException):
    """Raised inside a grader that ran past its time limit (a BaseException, so `except Exception` lets it pass)."""


def _raise_timeout(signum: int, frame: object) -> None:
    raise GraderTimeout


def _call_with_alarm(function: Callable[[], T], timeout_s: float) -> T:
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    collecting = gc.isenabled()
    gc.disable()
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, ALARM_REPEAT_S)
        return function()
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


def _call_in_worker(function: Callable[[], T], timeout_s: float) -> T:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
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
    return outcome["result"]  # type: ignore[return-value]


def check_timeout(timeout_s: float) -> None:
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


def call_with_timeout(function: Callable[[], T], timeout_s: float) -> T:
    """`function()`, or `GraderTimeout` raised once it has run `timeout_s` seconds (the mechanism above)."""
    check_timeout(timeout_s)
    in_main_thread = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    return (_call_with_alarm if in_main_thread else _call_in_worker)(function, timeout_s)
