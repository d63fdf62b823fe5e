"""The benchmarks that RESULTS.md cites keep running: every `benchmarks/*.py` imports and has a `main`, and the ones
whose smallest case takes seconds run it (the rest in the slow suite)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
# benchmark -> the arguments of its smallest case
SMALLEST = {"overhead": ["--steps", "1", "--warmup", "0", "--models", "embedded tiny"]}
SLOW_SMALLEST = {
    "shared_prompt": ["--shapes", "prompt-heavy", "--rounds", "1"],
    "cpu_step": ["--rounds", "1", "--precisions", "fp32"],
    "gpu_presets": ["--shrink", "--steps", "1", "--presets", "QWEN_0_5B_SMOKE"],
    "sampling": ["--shapes", "--step", "--rounds", "1", "--no_warmup"],  # both trainers, a whole step each
}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.stem)
def test_every_benchmark_imports_and_has_a_main(path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    assert callable(module.main)


def run_benchmark(name: str, arguments: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *arguments],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(("name", "arguments"), SMALLEST.items(), ids=SMALLEST)
def test_the_smallest_case_runs(name, arguments):
    assert run_benchmark(name, arguments).strip()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arguments"), SLOW_SMALLEST.items(), ids=SLOW_SMALLEST)
def test_the_smallest_case_of_a_longer_benchmark_runs(name, arguments):
    assert run_benchmark(name, arguments).strip()
