"""The CLI: preset defaults < --config YAML < flags; every TrainConfig field is a flag; bad names exit with the list."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nanopost_trl import analysis
from nanopost_trl.config import COMPLETIONS_SUFFIX, PRESET_HARDWARE, Preset, TrainConfig
from nanopost_trl.losses import Loss
from nanopost_trl.train import parse, parse_loss_args, task_list


def test_preset_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: TINY_SMOKE\nlearning_rate: 0.003\nnum_steps: 7\nloss: dg\n")
    cfg, run_args, _ = parse(["--config", str(config), "--num_steps", "9", "--bf16"])
    assert cfg == Preset.TINY_SMOKE.make(learning_rate=0.003, num_steps=9, bf16=True)
    assert run_args.loss == "dg" and run_args.preset == "TINY_SMOKE"


def test_no_arguments_is_the_embedded_default():
    cfg, run_args, _ = parse([])
    assert cfg == Preset.TINY_CPU.make()
    assert (run_args.loss, task_list(run_args)) == ("grpo", ["addition"])


def test_a_preset_brings_its_task_unless_tasks_are_named():
    assert task_list(parse(["--preset", "SMOLLM_CPU"])[1]) == ["arithmetic"]
    assert task_list(parse(["--preset", "SMOLLM_CPU", "--tasks", "gsm8k, math"])[1]) == ["gsm8k", "math"]


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


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanopost_trl.train", *args],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )


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
        (
            ["--loss", "ppo"],
            "unknown loss 'ppo'; valid: grpo, dg, kondo, pmpo, maxrl, dapo, gspo, cispo, sapo, luspo, vespo",
        ),
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


def test_list_and_help_show_presets_with_hardware_losses_and_task_sources_in_one_screen():
    listing = run_cli("--list")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) <= 40
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("  ")}
    assert set(PRESET_HARDWARE) == {preset.name for preset in Preset}
    for preset in Preset:
        assert PRESET_HARDWARE[preset.name] in lines[preset.name] and preset.value["model"] in lines[preset.name]
    for loss in Loss:
        assert inspect.getmodule(loss.value).__doc__.splitlines()[0] in lines[loss.name.lower()]
    assert "embedded" in lines["addition"] and "generated" in lines["countdown"]
    assert "openai/gsm8k" in lines["gsm8k"] and "NANOPOST_MATH_DIR" in lines["math"]

    first_screen = "\n".join(run_cli("--help").stdout.splitlines()[:45])
    assert listing.stdout.strip() in first_screen


def test_default_run_is_named_after_its_tasks_prints_progress_not_the_loss_and_records_the_runtime(tmp_path):
    """`nanopost-trl` as a new user runs it (TINY_SMOKE for time): run name, per-step line, warnings, config."""
    result = run_cli("--preset", "TINY_SMOKE", "--out_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (log,) = [path for path in tmp_path.glob("*.jsonl") if not path.name.endswith(COMPLETIONS_SUFFIX)]
    assert log.name.startswith("grpo-addition-s0-")
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2
    for line in step_lines:  # what tells progress; the loss (~0 by construction on-policy) is in the log only
        for part in ("reward ", "clipfrac ", "grad ", "len ", "held-out addition "):
            assert part in line, (part, line)
        assert "loss" not in line
    assert all("loss" in json.loads(row) for row in log.read_text().splitlines()[1:])
    assert "Warning" not in result.stderr, result.stderr  # e.g. transformers' is_gradient_checkpointing FutureWarning

    runtime = json.loads(log.with_name(f"{log.stem}-config.json").read_text())["runtime"]
    expected = {"num_processes": 1, "device": "cpu", "dtype": "float32", "mixed_precision": "no", "lora": False}
    assert runtime == {**expected, "deepspeed_stage": None, "fsdp_version": None}
    frame = analysis.load(tmp_path)
    assert (frame[list(expected)] == pd.Series(expected)).all().all() and frame["deepspeed_stage"].isna().all()


@pytest.mark.parametrize(("task", "env_var"), [("gsm8k", "NANOPOST_GSM8K_DIR"), ("math", "NANOPOST_MATH_DIR")])
def test_offline_hub_task_says_in_one_line_what_to_do_before_any_model_loads(tmp_path, task, env_var):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("--tasks", task, "--model", str(tmp_path / "no-model"), env=offline, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("nanopost-trl: error: could not load the dataset") and "Hugging Face Hub" in line
    assert "--data_dir DIR" in line and env_var in line and "train.jsonl and test.jsonl" in line


def test_smoke_run_from_the_command_line(tmp_path):
    result = run_cli("--preset", "TINY_SMOKE", "--loss", "dg", "--out_dir", str(tmp_path), "--run_name", "cli")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2] and "loss_gate_mean" in rows[1]
    assert "held-out greedy accuracy [addition]" in result.stdout
    assert json.loads((tmp_path / "cli-config.json").read_text())["loss"]["name"] == "dg"


def test_gradient_checkpointing_prints_no_deprecation_warnings(tmp_path):
    """TRL toggles gradient checkpointing around each generation through names transformers deprecated."""
    result = run_cli("--preset", "TINY_SMOKE", "--gradient_checkpointing", "True", "--out_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [("nope-model", "unknown model 'nope-model'; short names: nanopost-tiny, smollm2-135m-instruct"),
     ("/tmp/nanopost-missing.gguf", "GGUF file /tmp/nanopost-missing.gguf does not exist")],
)  # fmt: skip
def test_a_bad_model_fails_in_one_line_before_loading(model, message):
    result = run_cli("--preset", "TINY_SMOKE", "--model", model)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
