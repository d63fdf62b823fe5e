"""The CLI: preset defaults < --config YAML < flags; every TrainConfig field is a flag; bad names exit with the list."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from nanopost_trl.config import Preset, TrainConfig
from nanopost_trl.train import parse, parse_loss_args


def test_preset_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: TINY_SMOKE\nlearning_rate: 0.003\nnum_steps: 7\nloss: dg\n")
    cfg, run_args, _ = parse(["--config", str(config), "--num_steps", "9", "--bf16"])
    assert cfg == Preset.TINY_SMOKE.make(learning_rate=0.003, num_steps=9, bf16=True)
    assert run_args.loss == "dg" and run_args.preset == "TINY_SMOKE"


def test_no_arguments_is_the_embedded_default():
    cfg, run_args, _ = parse([])
    assert cfg == Preset.TINY_CPU.make()
    assert (run_args.loss, run_args.tasks) == ("grpo", "addition")


def test_preset_names_are_case_insensitive():
    cfg, _, _ = parse(["--preset", "qwen_1_5b_1xa100"])
    assert cfg == Preset.QWEN_1_5B_1xA100.make()


def test_loss_args_parse_python_literals():
    assert parse_loss_args("eta=0.5, aggregation=token_mean,kl_coef=None") == {
        "eta": 0.5,
        "aggregation": "token_mean",
        "kl_coef": None,
    }
    with pytest.raises(ValueError, match="not key=value"):
        parse_loss_args("eta")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanopost_trl.train", *args], capture_output=True, text=True)


def test_help_documents_every_field():
    result = run_cli("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in result.stdout, f.name
    assert "Actor re-copies the learner" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "QWEN_9B"], "unknown preset 'QWEN_9B'; valid: TINY_CPU"),
        (["--loss", "ppo"], "unknown loss 'ppo'; valid: grpo, dg, kondo, pmpo, maxrl"),
        (["--tasks", "gsm8k,nope"], "unknown task 'nope'; valid: addition"),
        (["--loss", "dg", "--loss_args", "etta=1"], "DGLoss has no field 'etta' (did you mean 'eta'?)"),
        (["--num_stepz", "3"], "unrecognized argument: --num_stepz (did you mean --num_steps?)"),
        (["--responses_per_prompt", "1"], "responses_per_prompt must be >= 2"),
        (["--eval_pass_k", "1"], "eval_pass_k must be 0 (off) or >= 2, got 1"),
        (["--loss", "kondo", "--loss_args", "unit=row"], "unknown Kondo unit 'row'; valid: 'token', 'sequence'"),
    ],
)
def test_bad_names_exit_with_the_valid_ones(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr


def test_list_prints_presets_losses_tasks():
    result = run_cli("--list")
    assert result.returncode == 0
    for name in ("TINY_CPU", "QWEN_3B_8xA100", "kondo", "maxrl", "gsm8k", "countdown"):
        assert name in result.stdout


def test_smoke_run_from_the_command_line(tmp_path):
    result = run_cli("--preset", "TINY_SMOKE", "--loss", "dg", "--out_dir", str(tmp_path), "--run_name", "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2] and "loss_gate_mean" in rows[1]
    assert "held-out greedy accuracy [addition]" in result.stdout
    assert json.loads((tmp_path / "cli-config.json").read_text())["loss"]["name"] == "dg"
