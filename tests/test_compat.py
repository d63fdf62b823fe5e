"""TRL compatibility: the hooks the adapter overrides exist with our arguments, the LossFn's loss is the one
back-propagated, TRL loss options a LossFn would silently drop are refused; a real older TRL in a slow test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import trl
from trl import GRPOTrainer

from nanopost_trl import compat
from nanopost_trl.config import Preset
from nanopost_trl.trainer import NanopostGRPOTrainer, Trainer

ROOT = Path(__file__).parents[1]


def test_pyproject_declares_the_supported_trl_range():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"trl{compat.SUPPORTED_TRL}" in dependencies
    assert trl.__version__ in compat.SpecifierSet(compat.SUPPORTED_TRL)  # the tests run on a supported TRL


def test_installed_trl_has_every_hook():
    compat.check_trl_hooks()


def test_a_removed_hook_stops_the_run_at_start_naming_the_supported_versions(tmp_path, monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    with pytest.raises(compat.UnsupportedTRL, match=r"GRPOTrainer has no method _calculate_rewards.*trl>=1\.16,<1\.17"):
        Trainer(Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="removed")).run()
    assert not (tmp_path / "removed.jsonl").exists()  # stopped before training


def test_a_hook_whose_arguments_changed_stops_the_run(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, model, inputs, num_items_in_batch: None)
    with pytest.raises(compat.UnsupportedTRL, match=r"_compute_loss\(self, model, inputs, num_items_in_batch\) no"):
        compat.check_trl_hooks()


def test_a_renamed_trl_module_attribute_stops_the_run(monkeypatch):
    import trl.trainer.utils

    monkeypatch.delattr(trl.trainer.utils, "_use_triton")
    with pytest.raises(compat.UnsupportedTRL, match=r"trl\.trainer\.utils has no _use_triton.*trl>=1\.16,<1\.17"):
        compat.check_trl_hooks()


class TRLLossInstead(NanopostGRPOTrainer):
    """TRL's own loss reaches the backward pass instead of the LossFn's, as with TRL's Liger path (trl#7270)."""

    calls_loss_fn = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.calls_loss_fn:
            self._compute_loss(model, inputs)  # computed, then dropped
        return GRPOTrainer._compute_loss(self, model, inputs)


@pytest.mark.parametrize(
    ("calls_loss_fn", "message"),
    [(False, "without calling the adapter's _compute_loss"), (True, "was not the tensor TRL back-propagated")],
)
def test_a_bypassed_loss_fn_stops_the_run_on_the_first_step(tiny_trainer, calls_loss_fn, message):
    trainer = tiny_trainer(type("Bypass", (TRLLossInstead,), {"calls_loss_fn": calls_loss_fn}))
    with pytest.raises(compat.UnsupportedTRL, match=message):
        trainer.train()


@pytest.mark.parametrize(
    ("option", "value"),
    [("top_entropy_quantile", 0.2), ("delta", 2.0), ("importance_sampling_level", "sequence"), ("entropy_coef", 0.01)],
)
def test_trl_loss_options_a_loss_fn_would_drop_are_refused(tiny_trainer, option, value):
    with pytest.raises(ValueError, match=rf"GRPOConfig options {{'{option}': .*LossFn replaces"):
        tiny_trainer(**{option: value})


@pytest.mark.slow
def test_check_stops_a_real_trl_1_15_naming_the_supported_range(tmp_path):
    """TRL 1.15 (below the declared range) installed beside the others: its hooks still fit our calls, but it lacks
    `trl.trainer.utils._use_triton` (its fused log-prob path differs; a 1.15 run fails inside it with this torch), so
    the start-up check stops with the supported range."""
    target = tmp_path / "trl115"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "trl==1.15.0"]
    subprocess.run(pip, check=True, timeout=300)
    script = (
        "import trl\nfrom nanopost_trl import compat\n"
        "assert trl.__version__ == '1.15.0', trl.__version__\n"
        "compat.check_trl_hooks()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "UnsupportedTRL: trl.trainer.utils has no _use_triton" in result.stderr
    assert "nanopost_trl supports trl>=1.16,<1.17 (installed: 1.15.0)" in result.stderr
