"""The TRL seam: the hooks the adapter overrides exist with our arguments, every private name the bridge reads exists
(a fake upgrade that renames one stops the run at start-up, naming it), TRL honours the fused-head switch, the
LossFn's loss is the one back-propagated, TRL loss options a LossFn would silently drop are refused, and nothing
outside the bridge names a TRL private; a real older TRL in a slow test."""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib
import torch
import trl
from trl import GRPOTrainer

from nanopost_trl import trl_bridge
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset
from nanopost_trl.trainer import Trainer

ROOT = Path(__file__).parents[1]


def test_pyproject_declares_the_supported_trl_range():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"trl{trl_bridge.SUPPORTED_TRL}" in dependencies
    assert trl.__version__ in trl_bridge.SpecifierSet(trl_bridge.SUPPORTED_TRL)  # the tests run on a supported TRL


def test_installed_trl_has_every_hook():
    trl_bridge.check_trl()


def test_a_removed_hook_stops_the_run_at_start_naming_the_supported_versions(tmp_path, monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    with pytest.raises(
        trl_bridge.UnsupportedTRL, match=r"GRPOTrainer has no method _calculate_rewards.*trl>=1\.16,<1\.17"
    ):
        Trainer(Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="removed")).run()
    assert not (tmp_path / "removed.jsonl").exists()  # stopped before training


def test_a_hook_whose_arguments_changed_stops_the_run(monkeypatch):
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, model, inputs, num_items_in_batch: None)
    with pytest.raises(trl_bridge.UnsupportedTRL, match=r"_compute_loss\(self, model, inputs, num_items_in_batch\) no"):
        trl_bridge.check_trl()


@pytest.mark.parametrize(
    ("module", "name"), [(module, name) for module, names in trl_bridge.PRIVATE_NAMES.items() for name in names]
)
def test_a_fake_upgrade_renaming_a_private_name_stops_the_run_at_start(tmp_path, monkeypatch, module, name):
    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(trl_bridge.UnsupportedTRL, match=rf"{re.escape(module)} has no {name}.*trl>=1\.16,<1\.17"):
        Trainer(Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="renamed")).run()
    assert not (tmp_path / "renamed.jsonl").exists()


def test_a_fake_upgrade_dropping_the_metrics_store_stops_the_run(tiny_trainer, monkeypatch):
    original = GRPOTrainer.__init__

    @functools.wraps(original)
    def without_metrics(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._metrics

    monkeypatch.setattr(GRPOTrainer, "__init__", without_metrics)
    with pytest.raises(trl_bridge.UnsupportedTRL, match="GRPOTrainer instances have no _metrics"):
        tiny_trainer()


def test_a_trl_that_stops_reading_the_fused_head_switch_is_caught_on_first_use(tiny_trainer, monkeypatch):
    """A TRL that keeps `_use_triton` and `_CHUNKED_LOGPROB_CHUNK_SIZE` but no longer reads them: the bridge's switch
    lands in a module that the fused head does not consult, so its kernel sees TRL's own width and every position."""
    import trl.trainer
    import trl.trainer.utils as trl_utils

    unread = types.ModuleType("trl.trainer.utils")
    unread.__dict__.update(vars(trl_utils))
    monkeypatch.setattr(trl.trainer, "utils", unread)
    trainer = tiny_trainer()
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(
        trl_bridge.UnsupportedTRL,
        match=r"ignored .*_CHUNKED_LOGPROB_CHUNK_SIZE.*on 6 positions .*saw \[\(\d+, 32768\)\]",
    ):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 3)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768 and "apply" not in vars(trl_utils._ChunkedLogProbFunction)


def test_the_fused_head_check_passes_on_this_trl_and_runs_once(tiny_trainer):
    trainer = tiny_trainer()
    ids = torch.ones(2, 6, dtype=torch.long)
    trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 3)
    assert trainer.fused_head_check.seen == [(6, 4096)] and trainer.fused_head_check.done


def test_no_module_outside_the_bridge_names_a_trl_private():
    """Apart from the hooks the adapter overrides (HOOKS) and its own attributes, only trl_bridge names TRL privates."""
    private = {name for names in trl_bridge.PRIVATE_NAMES.values() for name in names} | set(trl_bridge.TRAINER_STATE)
    private |= {"_tokenizer", "_logs", "_last_loaded_step", "_signature_columns"}  # more of GRPOTrainer's own state
    for path in (ROOT / "nanopost_trl").rglob("*.py"):
        if path.name == "trl_bridge.py":
            continue
        words = set(re.findall(r"\b_\w+", path.read_text()))
        assert not words & private, f"{path.relative_to(ROOT)} names TRL privates {sorted(words & private)}"


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
    with pytest.raises(trl_bridge.UnsupportedTRL, match=message):
        trainer.train()


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("top_entropy_quantile", 0.2, "top_entropy_quantile=1.0"),
        ("delta", 2.0, "delta=None"),
        ("importance_sampling_level", "sequence", "importance_sampling_level='token'"),
        ("entropy_coef", 0.01, "entropy_coef=0.0"),
    ],
)
def test_trl_loss_options_a_loss_fn_would_drop_are_refused_naming_its_field(tiny_trainer, option, value, field):
    with pytest.raises(ValueError, match=rf"would ignore: {option}={value!r} disagrees with GRPOLoss\.{field}"):
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
        "import trl\nfrom nanopost_trl import trl_bridge\n"
        "assert trl.__version__ == '1.15.0', trl.__version__\n"
        "trl_bridge.check_trl()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "UnsupportedTRL: trl.trainer.utils has no _use_triton" in result.stderr
    assert "nanopost_trl supports trl>=1.16,<1.17 (installed: 1.15.0)" in result.stderr


def test_liger_passes_through_with_the_fused_linear_cross_entropy_kept_off(tiny_trainer):
    """TRL 1.16 applies only Liger's layer kernels (Triton: GPU only) and keeps its fused linear cross-entropy, which
    replaced the model's forward and so bypassed the loss, off; the adapter's loss path is TRL's `_compute_loss` hook
    either way (and `BackpropCheck` verifies it on the first step), so the option is no longer refused."""
    trainer = tiny_trainer(use_liger_kernel=True)
    assert trainer.args.use_liger_kernel and trainer.args.liger_kernel_config == {"fused_linear_cross_entropy": False}


def attributes_read(tree, owner: str, through: str | None = None) -> set[str]:
    """The attributes `owner.<name>` (with `through`: `owner.<through>.<name>`) read in `tree`."""
    import ast

    def is_owner(node) -> bool:
        if through is not None:
            if not (isinstance(node, ast.Attribute) and node.attr == through):
                return False
            node = node.value
        return isinstance(node, ast.Name) and node.id == owner

    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and is_owner(node.value)
    }


def test_every_trainer_attribute_read_outside_the_bridge_is_listed_and_checked_at_start():
    """Not only TRL's underscore names: in every module but the bridge, a trainer attribute read by the adapter
    (`self.X`) or by a feature (`trainer.X`) is the adapter's own, transformers.Trainer's public API, or in the
    bridge's checked lists; GRPOTrainer's own attributes are read through the checked view only (`.grpo.X`), so a TRL
    that renames one stops at start-up."""
    import ast

    import transformers

    from nanopost_trl.adapter import NanopostGRPOTrainer

    package = ROOT / "nanopost_trl"
    adapter_tree = ast.parse((package / "adapter.py").read_text())
    assigned = {
        node.attr
        for node in ast.walk(adapter_tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }  # fmt: skip
    ours = set(vars(NanopostGRPOTrainer)) | assigned
    transformers_api = {name for name in dir(transformers.Trainer) if not name.startswith("_")}
    lists = (trl_bridge.TRAINER_ATTRIBUTES, trl_bridge.TRAINING_LOOP_ATTRIBUTES)
    allowed = ours | transformers_api | {name for names in lists for name in names}
    view = set(trl_bridge.GRPOView.__annotations__)
    checked = 0
    for path in sorted(package.rglob("*.py")):
        if path.name == "trl_bridge.py":
            continue
        tree = ast.parse(path.read_text())
        owner = "self" if path.name == "adapter.py" else "trainer"
        direct = attributes_read(tree, owner)
        assert direct <= allowed, (path.name, sorted(direct - allowed))
        through_view = attributes_read(tree, owner, through="grpo")
        assert through_view <= view, (path.name, sorted(through_view - view))
        checked += len(direct) + len(through_view)
    assert checked > 30  # the walk found the adapter's reads


def test_the_view_refuses_a_name_it_does_not_list(tiny_trainer):
    trainer = tiny_trainer()
    assert trainer.grpo.num_generations == trainer.num_generations
    with pytest.raises(AttributeError, match="beta is not a GRPOTrainer attribute the bridge reads"):
        _ = trainer.grpo.beta


def test_a_trl_that_drops_a_read_attribute_stops_at_start(tiny_trainer, monkeypatch):
    original = GRPOTrainer.__init__

    @functools.wraps(original)
    def without_eos_ids(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self.eos_token_ids

    monkeypatch.setattr(GRPOTrainer, "__init__", without_eos_ids)
    with pytest.raises(trl_bridge.UnsupportedTRL, match="GRPOTrainer instances have no eos_token_ids"):
        tiny_trainer()
