"""examples/launch_modal.py builds its run list and image locally; no remote call is made."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import pytest

modal = pytest.importorskip("modal")

LAUNCHER = Path(__file__).resolve().parents[1] / "examples" / "launch_modal.py"


@pytest.fixture(scope="module")
def launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("launch_modal", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_is_one_run(launcher: ModuleType) -> None:
    (run,) = launcher.sweep_runs(True)
    assert run["preset"] == "QWEN_0_5B_SMOKE"
    assert run["loss"] == launcher.DEFAULT_LOSS
    assert set(run) == {"preset", "loss", "seed", "run_name"}  # train's keyword arguments


def test_sweep_is_5_losses_x_3_seeds(launcher: ModuleType) -> None:
    runs = launcher.sweep_runs(False)
    assert len(runs) == 15
    assert len({r["run_name"] for r in runs}) == 15
    assert {r["preset"] for r in runs} == {"QWEN_1_5B_1xA100"}
    expected = itertools.product(["grpo", "dg", "kondo", "pmpo", "maxrl"], [0, 1, 2])
    assert sorted((r["loss"], r["seed"]) for r in runs) == sorted(expected)


def test_image_and_app(launcher: ModuleType) -> None:
    assert isinstance(launcher.image, modal.Image)
    assert isinstance(launcher.app, modal.App)
    assert launcher.RESULTS_DIR == "/results"
    assert (launcher.PROJECT_DIR / "pyproject.toml").is_file()  # the dir the image pip-installs from
