"""Root conftest of the harness's temporary test tree: offline datasets, per-test timeout, per-test results as JSON.

Copied by run_trl_tests.py to `<tmp>/conftest.py`, above the `tests/` package holding TRL's test files, so it is
loaded before TRL's own conftest and test module. Environment it reads:

- TRL_HARNESS_DATASETS: folder with `<org>/<name>/` local dataset repos (README.md YAML configs + parquet files);
  `datasets.load_dataset("<org>/<name>", ...)` is redirected there when that folder exists.
- TRL_HARNESS_TIMEOUT: seconds a test's call phase may run before it fails with TimeoutError (0: no limit).
- TRL_HARNESS_RESULTS: JSON-lines file that gets one line per finished test: nodeid, outcome, first message line.
"""

import importlib
import json
import os
import signal
from pathlib import Path

import datasets
import pytest


def _missing_availability_check(name: str):
    """TRL's testing_utils may import `is_<extra>_available` checks that the installed TRL lacks; such an extra is
    not installed here, so the check answers False (and the tests needing it are skipped)."""
    if name.startswith("is_") and name.endswith("_available"):
        return lambda: False
    raise AttributeError(f"module 'trl.import_utils' has no attribute {name!r}")


_trl_import_utils = importlib.import_module("trl.import_utils")
if not hasattr(_trl_import_utils, "__getattr__"):
    _trl_import_utils.__getattr__ = _missing_availability_check

_DATASETS_DIR = Path(os.environ.get("TRL_HARNESS_DATASETS", "/nonexistent"))
_original_load_dataset = datasets.load_dataset


def _load_local_dataset(path, *args, **kwargs):
    """`datasets.load_dataset`, reading hub ids that have a local stand-in from TRL_HARNESS_DATASETS."""
    local = _DATASETS_DIR / str(path)
    if "/" in str(path) and local.is_dir():
        path = str(local)
    return _original_load_dataset(path, *args, **kwargs)


datasets.load_dataset = _load_local_dataset  # before the test module runs `from datasets import load_dataset`


class TestTimeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise TestTimeout(f"test exceeded TRL_HARNESS_TIMEOUT={os.environ['TRL_HARNESS_TIMEOUT']}s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = int(os.environ.get("TRL_HARNESS_TIMEOUT", "0"))
    if seconds:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
        signal.alarm(seconds)
    try:
        yield
    finally:
        if seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def _first_line(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: reason")
        return str(report.longrepr[2]).splitlines()[0] if report.longrepr[2] else ""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:500] if lines else ""


_phases: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    """Fold setup/call/teardown reports into one outcome per test; write it when the test is done."""
    results_path = os.environ.get("TRL_HARNESS_RESULTS")
    if not results_path or os.environ.get("PYTEST_XDIST_WORKER"):  # with xdist, the controller records
        return
    state = _phases.setdefault(report.nodeid, {"outcome": None, "message": "", "duration": 0.0})
    state["duration"] += report.duration
    if state["outcome"] is None or state["outcome"] in ("passed",):
        if hasattr(report, "wasxfail"):
            state["outcome"] = "xfailed" if report.skipped else "xpassed"
            state["message"] = report.wasxfail
        elif report.failed:
            state["outcome"] = "failed" if report.when == "call" else "error"
            state["message"] = _first_line(report)
        elif report.skipped:
            state["outcome"] = "skipped"
            state["message"] = _first_line(report)
        elif report.when == "call":
            state["outcome"] = "passed"
    if report.when == "teardown":
        if report.failed and state["outcome"] == "passed":
            state["outcome"], state["message"] = "error", _first_line(report)
        with open(results_path, "a") as results_file:
            results_file.write(json.dumps({"nodeid": report.nodeid, **_phases.pop(report.nodeid)}) + "\n")
