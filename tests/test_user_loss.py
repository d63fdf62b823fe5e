"""A user's one-file loss, loaded by path as `--loss path/to/my_loss.py:ClassName` does, and bad specs in one line."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from nanopost_trl.base import LossFn
from nanopost_trl.config import Preset
from nanopost_trl.losses import DAPOLoss, loss_class
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows

MY_LOSS = textwrap.dedent(
    '''
    import dataclasses

    import torch

    from nanopost_trl import base


    @dataclasses.dataclass
    class ScaledPG(base.LossFn):
        """Advantage-weighted log-likelihood, scaled."""

        scale: float = 1.0

        def __call__(self, batch):
            mask = batch.mask
            loss = -(batch.policy_logprobs * batch.advantages * mask).sum() / mask.sum().clamp(min=1)
            return self.scale * loss, {"scale": self.scale}


    class NotALoss:
        pass
    '''
)


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "my_loss.py"
    path.write_text(MY_LOSS)
    return path


def test_a_loss_from_a_file_trains_and_logs_its_metrics(tmp_path, loss_file):
    cls = loss_class(f"{loss_file}:ScaledPG")
    assert issubclass(cls, LossFn) and dataclasses.is_dataclass(cls)
    summary = Trainer(Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="mine")).run(loss_fn=cls(scale=0.5))
    assert [row["loss_scale"] for row in read_rows(summary.log_path)[1:]] == [0.5, 0.5]


def test_builtins_by_name():
    assert loss_class("DAPO") is DAPOLoss and loss_class("dapo") is DAPOLoss


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:ScaledPG", r"--loss {dir}/missing.py:ScaledPG: no file {dir}/missing.py"),
        ("{file}:Absent", r"Absent is not defined in {file} \(its LossFn classes: ScaledPG\)"),
        ("{file}:NotALoss", r"NotALoss is a type, not a nanopost_trl.base.LossFn subclass"),
        (
            "dapoo",
            r"unknown loss 'dapoo'; valid: grpo, .*dapo.*, or a file of your own as path/to/my_loss.py:ClassName",
        ),
    ],
)
def test_bad_loss_specs_fail_in_one_line(tmp_path, loss_file, spec, message):
    fill = {"dir": tmp_path, "file": loss_file}
    with pytest.raises(ValueError, match=message.format(**fill)):
        loss_class(spec.format(**fill))


def test_the_command_line_runs_a_loss_from_a_file_with_its_arguments(tmp_path, loss_file, capsys):
    from nanopost_trl.cli import main

    flags = ["--preset", "TINY_SMOKE", "--out_dir", str(tmp_path), "--run_name", "cli"]
    main([*flags, "--loss", f"{loss_file}:ScaledPG", "--loss_args", "scale=2"])
    assert [row["loss_scale"] for row in read_rows(tmp_path / "cli.jsonl")[1:]] == [2.0, 2.0]
    assert "held-out" in capsys.readouterr().out
