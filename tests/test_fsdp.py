"""FSDP2: the accelerate configs, the planner's per-process estimate, the features a sharded launch refuses, and
what an FSDP config does on CPU processes (accelerate enables FSDP on GPUs only: a clear error instead of a silent
DDP run). The real FSDP2 run, resume included, needs a GPU (skipped without one)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO, run

from nanopost_trl import memory
from nanopost_trl.cli import main
from nanopost_trl.config import QWEN_1_5B, QWEN_3B, Preset, check_sharding
from nanopost_trl.utils import read_rows

CONFIGS = REPO / "accelerate_configs"


def fsdp_launch(*args: str, num_processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml")]
    command += ["--num_processes", str(num_processes), "--mixed_precision", "no", "-m", "nanopost_trl.train", *args]
    return run(command)


@pytest.mark.parametrize("name", ["fsdp2.yaml", "fsdp2_multi_node.yaml"])
def test_configs_are_fsdp2_over_every_process(name):
    launch = load_config_from_file(str(CONFIGS / name))
    assert launch.distributed_type == "FSDP" and launch.fsdp_config["fsdp_version"] == 2
    assert launch.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert launch.num_processes == launch.num_machines * 8 and launch.mixed_precision == "bf16"


def test_layer_params_are_one_decoder_layers():
    shape = memory.model_shape(QWEN_1_5B)
    hidden, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    attention = 2 * (hidden * hidden + hidden) + 2 * (hidden * kv + kv) - hidden  # q, o (no bias), k, v
    assert shape.layer_params == attention + 3 * hidden * shape.intermediate_size + 2 * hidden  # MLP, 2 norms


def test_fsdp_shards_like_zero3_in_the_weights_dtype_and_never_gathers_the_whole_model():
    shape, cfg = memory.model_shape(QWEN_3B), Preset.QWEN_3B_8xA100.make(kl_coef=0.04)

    def est(**kwargs):
        return memory.estimate(cfg, num_processes=8, shape=shape, on_gpu=True, advise=False, **kwargs)

    fsdp, zero3, ddp = est(fsdp=True), est(zero_stage=3), est()
    # bf16 mixed precision: the fp32 shards are the master weights (DeepSpeed keeps a bf16 module + fp32 masters)
    assert fsdp.parts["policy weights"] == fsdp.parts["reference model"] == shape.num_params * 4 // 8
    assert fsdp.parts["gradients"] == shape.num_params * 4 // 8
    assert fsdp.parts["AdamW states"] == 2 * shape.num_params * 4 // 8 and fsdp.parts["fp32 master weights"] == 0
    root = shape.num_params - shape.num_layers * shape.layer_params  # embeddings (tied head), final norm
    assert fsdp.parts["FSDP gathered units"] == (root + 2 * shape.layer_params) * 2  # bf16 compute
    assert zero3.parts["FSDP gathered units"] == ddp.parts["FSDP gathered units"] == 0
    # ZeRO-3 gathers every weight for generation; FSDP2 a layer at a time
    assert fsdp.generation_peak < zero3.generation_peak and fsdp.peak < ddp.peak / 3
    assert "8 process(es), FSDP2," in fsdp.setting


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(sync_interval=2), "sync_interval > 1 keeps a full actor copy of the weights: not supported with FSDP"),
        (dict(offload_reference=True, kl_coef=0.04), "offload_reference: not supported with FSDP"),
    ],
)
def test_features_that_need_a_processs_full_weights_are_refused_under_fsdp(overrides, message):
    cfg = Preset.QWEN_3B_8xA100.make(**overrides)
    check_sharding(cfg)  # fine without sharding
    with pytest.raises(ValueError, match=message):
        check_sharding(cfg, fsdp=True)
    with pytest.raises(ValueError, match=message):
        memory.estimate(cfg, num_processes=8, fsdp=True, on_gpu=True)
    with pytest.raises(ValueError, match="fsdp and DeepSpeed ZeRO-3 are two launches"):
        memory.estimate(dataclasses.replace(cfg, sync_interval=1, offload_reference=False), fsdp=True, zero_stage=3)


def test_cli_estimate_under_fsdp(capsys):
    main(["--preset", "QWEN_3B_8xA100", "--estimate", "--fsdp"])  # the preset's 8 x 40 GB, not its ZeRO-2
    out = capsys.readouterr().out
    assert "8 process(es), FSDP2," in out and "FSDP gathered units" in out and "fits a 40 GiB device" in out


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_is_refused(tiny_trainer, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from an FSDP config
    with pytest.raises(ValueError, match="accelerate enables FSDP on GPUs only"):
        tiny_trainer()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU processes only")
def test_fsdp_config_on_two_cpu_processes_stops_at_start(tmp_path):
    result = fsdp_launch("--preset", "TINY_SMOKE", "--out_dir", str(tmp_path), "--run_name", "fsdp")
    assert result.returncode != 0
    assert "accelerate enables FSDP on GPUs only (on CPU processes it would run plain DDP)" in result.stderr
    assert not (tmp_path / "fsdp.jsonl").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP on GPUs only")
def test_fsdp2_run_checkpoints_and_resumes(tmp_path):
    processes = min(2, torch.cuda.device_count())
    run = ("--preset", "TINY_SMOKE", "--save_every", "1", "--out_dir", str(tmp_path), "--run_name", "fsdp")
    result = fsdp_launch(*run, num_processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "fsdp.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]
    runtime = json.loads((tmp_path / "fsdp-config.json").read_text())["runtime"]
    assert runtime["fsdp_version"] == 2 and runtime["num_processes"] == processes
    result = fsdp_launch(*run, "--num_steps", "3", "--resume", "latest", num_processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = read_rows(tmp_path / "fsdp.jsonl")
    assert [row["step"] for row in resumed] == [0, 1, 2, 3] and resumed[:3] == rows
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").exists()
