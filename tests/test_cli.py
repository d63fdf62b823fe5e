"""The CLI: preset defaults < --config YAML < flags; every TrainConfig field is a flag; bad names exit with the list."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from trl import GRPOConfig

from nanopost_trl import analysis, checkpoints
from nanopost_trl.cli import main, parse, parse_loss_args, task_list
from nanopost_trl.config import (
    COMPLETIONS_SUFFIX,
    TRL_NAMES,
    Preset,
    PresetSpec,
    TrainConfig,
    run_to_resume,
    to_grpo_config,
    trl_meaning,
)
from nanopost_trl.losses import Loss
from nanopost_trl.tasks import task_names


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


def test_loss_and_config_values_are_checked_and_converted_to_their_field_types():
    loss = Loss.GRPO.make(**parse_loss_args("eps_low=1, kl_coef=None, max_new_tokens=8.0, kl_ratio_correction=true"))
    assert (loss.eps_low, loss.kl_coef, loss.max_new_tokens, loss.kl_ratio_correction) == (1.0, None, 8, True)
    assert type(loss.eps_low) is float and type(loss.max_new_tokens) is int
    for overrides, message in [
        (dict(eps_low="wide"), "GRPOLoss.eps_low='wide': expected float"),
        (dict(eps_low=True), "GRPOLoss.eps_low=True: expected float"),
        (dict(aggregation="mean"), "GRPOLoss.aggregation='mean': expected one of 'seq_mean', 'token_mean', 'constant'"),
        (dict(kl_ratio_correction="maybe"), "GRPOLoss.kl_ratio_correction='maybe': expected bool"),
    ]:
        with pytest.raises(TypeError, match=re.escape(message)):
            Loss.GRPO.make(**overrides)
    cfg = Preset.TINY_SMOKE.make(num_steps="3", out_dir=Path("/tmp/out"), data_dir=None)
    assert (cfg.num_steps, cfg.out_dir, cfg.data_dir) == (3, "/tmp/out", None)


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
            "unknown loss 'ppo'; valid: grpo, dg, kondo, pmpo, maxrl, dapo, gspo, cispo, sapo, luspo, vespo, or a file "
            "of your own as path/to/my_loss.py:ClassName",
        ),
        (["--tasks", "gsm8k,nope"], "unknown task 'nope'; valid: addition"),
        (["--loss", "dg", "--loss_args", "etta=1"], "DGLoss has no field 'etta' (did you mean 'eta'?)"),
        (["--num_stepz", "3"], "unrecognized argument: --num_stepz (did you mean --num_steps?)"),
        (["--responses_per_prompt", "1"], "responses_per_prompt must be >= 2"),
        (["--eval_pass_k", "1"], "eval_pass_k must be 0 (off) or >= 2, got 1"),
        (["--loss", "kondo", "--loss_args", "unit=row"], "KondoLoss.unit='row': expected one of 'token', 'sequence'"),
        (["--loss", "/nonexistent/my_loss.py:MyLoss"], "--loss /nonexistent/my_loss.py:MyLoss: no file"),
        (["--loss", f"{__file__}:TrainConfig"], "TrainConfig is a type, not a nanopost_trl.base.LossFn subclass"),
        (["--loss", "examples/simple_pg.py:SimplePG", "--loss_args", "kl_coef=x"], "SimplePG.kl_coef='x': expected"),
    ],
)
def test_bad_names_exit_with_the_valid_ones(args, message):
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 2  # the usage line, then the one-line error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "dg", "--loss_args", "eta=abc"], "DGLoss.eta='abc': expected float"),
        (["--loss", "dg", "--loss_args", "max_new_tokens=2.5"], "DGLoss.max_new_tokens=2.5: expected int or None"),
        (["--model", __file__], f"model '{__file__}' is a file but not a .gguf file; model= takes a short name"),
        (["--micro_batch_size", "3"], "micro_batch_size=3 must divide the 256 completions each process handles"),
        (["--chat_template", "qwen25"], "unknown chat template 'qwen25': a .jinja file, or one of TRL's: "),
        (["--num_generations", "4", "--responses_per_prompt", "8"], "set the same field to different values"),
        (["--loss_type", "dr_grpo"], "not set here: loss_type (the loss is chosen with --loss"),
        (["--epsilon", "0.3"], "not set here: epsilon (the loss's option: --loss_args eps_low=VALUE)"),
        (["--warmup_ratio", "0.1"], "--warmup_ratio (neither ours nor an option of TRL 1.16"),
        (["--model", "acme/nothing-7b"], "'acme/nothing-7b' is not in the local hub cache and the hub cannot"),
        (["--gradient_accumulation_steps", "4"], "set --micro_batch_size"),
        (["--num_generatons", "4"], "--num_generatons (did you mean --num_generations? TRL's name for --responses_pe"),
        (["--num_iteratoins", "2"], "--num_iteratoins (did you mean --num_iterations?)"),
        (["--num_iter", "2"], "unrecognized argument: --num_iter"),  # no prefix matching: a flag is named in full
    ],
)
def test_bad_input_fails_in_one_line_before_the_model_loads(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    usage, error = capsys.readouterr().err.strip().splitlines()  # parser.error: the usage, then one line
    assert exit.value.code == 2 and usage.startswith("usage: nanopost-trl") and message in error, error


def test_trl_names_set_our_fields_on_the_command_line_in_yaml_and_in_preset_make(tmp_path, capsys):
    trl = dict(num_generations=4, max_completion_length=16, beta=0.05, per_device_train_batch_size=4, max_steps=3)
    ours = dict(responses_per_prompt=4, max_new_tokens=16, kl_coef=0.05, micro_batch_size=4, num_steps=3)
    expected = Preset.TINY_SMOKE.make(**ours)

    flags = [item for name, value in trl.items() for item in (f"--{name}", str(value))]
    assert parse(["--preset", "TINY_SMOKE", *flags, "--kl_coef", "0.05"])[0] == expected  # the same value twice: fine
    said = capsys.readouterr().err.splitlines()
    assert len(said) == len(trl) and "num_generations is TRL's name for responses_per_prompt: set " in said[0]

    config = tmp_path / "run.yaml"
    config.write_text("preset: TINY_SMOKE\n" + "".join(f"{name}: {value}\n" for name, value in trl.items()))
    assert parse(["--config", str(config)])[0] == expected
    assert parse(["--config", str(config), "--responses_per_prompt", "2"])[0].responses_per_prompt == 2  # flags win
    assert "--config: max_steps is TRL's name for num_steps: set num_steps=3" in capsys.readouterr().err

    with pytest.warns(UserWarning) as warned:
        assert Preset.TINY_SMOKE.make(**trl) == expected
    assert "beta is TRL's name for kl_coef: set kl_coef=0.05" in [str(w.message) for w in warned] and len(warned) == 5
    with pytest.raises(ValueError, match="beta=0.1 .*and kl_coef=0.2 set the same field to different values"):
        Preset.TINY_SMOKE.make(beta=0.1, kl_coef=0.2)
    with pytest.raises(ValueError, match=r"not set here: generation_batch_size \(.*set --prompts_per_step"):
        Preset.TINY_SMOKE.make(generation_batch_size=64)
    config.write_text("preset: TINY_SMOKE\nloss_type: dapo\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(config)])
    assert "not set here: loss_type (the loss is chosen" in capsys.readouterr().err

    switches = parse(["--activation_checkpointing", "--report_to", "wandb", "--hub_private_repo", "false"])[0]
    assert (switches.gradient_checkpointing, switches.wandb_log, switches.hub_private) == (True, True, False)
    with pytest.raises(ValueError, match="report_to='tensorboard': a run reports to W&B only"):
        Preset.TINY_SMOKE.make(report_to="tensorboard")


def test_every_trl_name_maps_to_a_field_or_says_what_to_use_and_the_readme_lists_them():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command_line = readme[readme.index("## Command line") : readme.index("## Presets")]
    for trl_name, meaning in TRL_NAMES.items():
        assert trl_name not in fields and (meaning.field in fields or (meaning.field is None and meaning.why))
        assert f"`{trl_name}`" in command_line, trl_name
    for trl_name in GRPOConfig.__dataclass_fields__:  # every GRPOConfig name: ours, mapped, passed on, or refused
        meaning = trl_meaning(trl_name)
        assert (trl_name in fields) if meaning is None else (meaning.field in fields or meaning.why), trl_name


def test_trl_options_pass_through_and_every_refusal_is_reported_at_once(tmp_path, capsys):
    cfg = parse(["--preset", "TINY_SMOKE", "--scale_rewards", "none", "--top_k", "20", "--use_adaptive_entropy"])[0]
    assert cfg.trl_args == {"scale_rewards": "none", "top_k": 20, "use_adaptive_entropy": True}
    args = to_grpo_config(dataclasses.replace(cfg, run_name="r"), num_processes=1)
    assert (args.scale_rewards, args.top_k, args.use_adaptive_entropy) == ("none", 20, True)
    config = tmp_path / "run.yaml"
    config.write_text("preset: TINY_SMOKE\nloss_type: grpo\nepsilon: 0.3\nuse_cpu: true\nscale_rewards: batch\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(config)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(f"{name} (" in error for name in ("loss_type", "epsilon", "use_cpu")) and "scale_rewards" not in error
    with pytest.raises(SystemExit):
        main(["--warmup_ratio", "0.1", "--num_stepz", "2"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--warmup_ratio (neither" in error and "--num_stepz (did you mean --num_steps?)" in error


def test_unknown_name_hints_never_point_to_a_field_of_another_meaning():
    from nanopost_trl.utils import close_match

    flags = [f.name for f in dataclasses.fields(TrainConfig)]
    assert close_match("num_generations", flags) is None  # not num_iterations
    assert close_match("num_stepz", flags) == "num_steps"
    with pytest.raises(TypeError, match=r"TrainConfig has no field 'num_generation'; valid"):
        Preset.TINY_SMOKE.make(num_generation=4)


def test_every_preset_is_one_record_with_every_fact():
    for preset in Preset:
        spec = preset.value
        assert isinstance(spec, PresetSpec) and spec.hardware and spec.task in task_names(), preset.name
        assert isinstance(preset.make(), TrainConfig) and task_list(parse(["--preset", preset.name])[1]) == [spec.task]
        assert (spec.target is not None) == ("CPU" not in spec.hardware), preset.name  # every GPU preset: a target
        if spec.target is not None:
            assert spec.target.processes >= 1 and spec.target.gib > 0 and spec.target.zero_stage in (0, 2, 3)
            assert (
                str(spec.target.processes) in spec.hardware
                and str(spec.target.gib) in spec.hardware
                or (spec.hardware == "any GPU")
            )


def test_resume_latest_finds_the_newest_run_with_a_checkpoint_or_says_there_is_none(tmp_path):
    cfg = Preset.TINY_SMOKE.make(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"no run to resume in out_dir='{tmp_path}'"):
        run_to_resume(cfg)
    for run, age in [("old", 100), ("new", 10), ("no-checkpoint", 0)]:
        checkpoint = tmp_path / run / "checkpoint-2"
        checkpoint.mkdir(parents=True)
        if run != "no-checkpoint":
            (checkpoint / "trainer_state.json").write_text("{}")
            checkpoints.write_manifest(checkpoint, checkpoints.file_records(checkpoint, ["trainer_state.json"]))
            os.utime(checkpoint, (time.time() - age, time.time() - age))
    assert run_to_resume(cfg) == "new"
    assert run_to_resume(dataclasses.replace(cfg, run_name="old")) == "old"
    with pytest.raises(ValueError, match="no checkpoint of run 'no-checkpoint' to resume"):
        run_to_resume(dataclasses.replace(cfg, run_name="no-checkpoint"))
    result = run_cli("--preset", "TINY_SMOKE", "--resume", "latest", "--out_dir", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no run to resume in out_dir=" in result.stderr


def test_list_and_help_show_presets_with_hardware_losses_and_task_sources_in_one_screen():
    listing = run_cli("--list")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) <= 40
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("  ")}
    for preset in Preset:
        assert preset.value.hardware in lines[preset.name] and preset.value.config["model"] in lines[preset.name]
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
    result = run_cli("--tasks", task, env=offline, cwd=tmp_path)  # the data fails before the (embedded) model loads
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
    [("nope-model", "unknown model 'nope-model'; model= takes a short name (nanopost-tiny, smollm2-135m-instruct)"),
     ("/tmp/nanopost-missing.gguf", "GGUF file /tmp/nanopost-missing.gguf does not exist")],
)  # fmt: skip
def test_a_bad_model_fails_in_one_line_before_loading(model, message):
    result = run_cli("--preset", "TINY_SMOKE", "--model", model)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
