"""Scale-out features on the embedded tiny model: LoRA, checkpoint/resume, the Hub model card and push, W&B logging,
and DeepSpeed ZeRO-2 on CPU processes."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nanopost_trl import hub
from nanopost_trl.assets import TINY_MODEL_PATH
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.run_log import RunSummary
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows

REPO = Path(__file__).parents[1]


def smoke(tmp_path, **overrides):
    return Preset.TINY_SMOKE.make(**{"out_dir": str(tmp_path), "run_name": "run", **overrides})


def first_digit_reward(completions: list[str], instances: list) -> list[float]:
    """The completion's first digit: spread within a group whenever its samples differ, so the steps have a gradient."""
    return [float(completion[0]) if completion[:1].isdigit() else 0.0 for completion in completions]


def embedded_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32)  # as TINY_SMOKE loads it


# --- LoRA
def test_lora_trains_the_adapter_only_against_the_adapter_free_reference(tmp_path):
    base = embedded_model().state_dict()
    trainer = Trainer(smoke(tmp_path, lora_r=4, kl_coef=0.1))
    summary = trainer.run(tasks="addition", reward_fn=first_digit_reward)
    grpo = trainer.grpo_trainer
    assert grpo.ref_model is None  # reference log-probs: the same model with its adapter disabled
    assert summary.final_metrics["loss_kl_ref"] > 0  # step 2's policy has moved away from the base model

    adapter = {name: param for name, param in grpo.model.named_parameters() if "lora_" in name}
    assert adapter and all(param.requires_grad for param in adapter.values())
    assert any(param.abs().sum() > 0 for name, param in adapter.items() if "lora_B" in name)  # lora_B starts at 0
    for name, param in grpo.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad and torch.equal(param, base[name.replace(".base_layer", "")]), name

    files = {path.name for path in summary.model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    assert "model.safetensors" not in files
    saved = load_file(summary.model_dir / "adapter_model.safetensors")
    assert saved.keys() == {name.replace(".default", "") for name in adapter}
    for name, param in adapter.items():
        assert torch.equal(saved[name.replace(".default", "")], param), name


def test_merge_adapter_on_save_writes_a_plain_model_with_only_the_adapted_layers_changed(tmp_path):
    cfg = smoke(tmp_path, lora_r=4, merge_adapter_on_save=True)
    summary = Trainer(cfg).run(tasks="addition", reward_fn=first_digit_reward)
    files = {path.name for path in summary.model_dir.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(summary.model_dir)
    base = embedded_model()
    changed = {name for name, param in merged.named_parameters() if not torch.equal(param, base.get_parameter(name))}
    assert changed and all(name.endswith("proj.weight") for name in changed), changed  # LoRA's linear layers only


# --- model card and push
def test_final_model_card_and_push_to_hub(tmp_path, monkeypatch):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)  # the Hub is the one thing not reachable here
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cfg = smoke(tmp_path, push_to_hub=True, hub_model_id="me/tiny-grpo", save_final_model=False)
    summary = Trainer(cfg).run(loss_fn=GRPOLoss(kl_coef=0.05), tasks="addition")

    card = (summary.model_dir / "README.md").read_text()
    before, after = summary.eval_before["addition"], summary.eval_after["addition"]
    assert f"| addition | {before:.1%} | {after:.1%} |" in card
    assert "RL post-training of `nanopost-tiny`" in card and "the full fine-tuned model" in card
    assert "`nanopost_trl.losses.grpo.GRPOLoss`" in card and '"kl_coef": 0.05' in card
    assert "## Tasks\n\naddition" in card and '"num_steps": 2' in card and '"hub_model_id": "me/tiny-grpo"' in card
    assert "library_name: transformers" in card and "base_model" not in card  # the embedded model is not on the Hub

    (_, repo_id, repo_kwargs), (_, upload, uploaded) = calls
    assert repo_id == "me/tiny-grpo" and repo_kwargs == {"private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-grpo" and upload["folder_path"] == str(summary.model_dir)
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(uploaded)


def test_model_card_names_a_hub_base_model_and_the_adapter(tmp_path):
    record = {
        "run_name": "dg-gsm8k",
        "config": Preset.QWEN_1_5B_LORA_24GB.make(run_name="dg-gsm8k").to_dict(),
        "loss": {"name": "dg", "class": "nanopost_trl.losses.dg.DGLoss", "args": {"eta": 0.5}},
        "tasks": ["gsm8k"],
        "versions": {"trl": "1.16.0"},
    }
    summary = RunSummary(
        run_name="dg-gsm8k",
        log_path=tmp_path / "dg-gsm8k.jsonl",
        config_path=tmp_path / "dg-gsm8k-config.json",
        model_dir=tmp_path / "final",
        eval_before={"gsm8k": 0.25},
        eval_after={"gsm8k": 0.5},
        reward_first=0.1,
        reward_last=0.4,
        final_metrics={},
    )
    card = hub.model_card(record, summary)
    assert "base_model: Qwen/Qwen2.5-1.5B-Instruct" in card and "library_name: peft" in card
    assert "a LoRA adapter (peft, r=32, alpha=64)" in card and "| gsm8k | 25.0% | 50.0% |" in card
    assert "0.100 -> 0.400" in card and "tags:\n- nanopost_trl\n- trl\n- reinforcement-learning\n- dg" in card


# --- Weights & Biases
def wandb_records(run_file: Path) -> list:
    """The protobuf records of a `.wandb` run file (a LevelDB-style log: 7-byte header, then 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type 1 = full / 2 = first / 3 = middle / 4 = last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, records = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_config_mapping_leaves_the_environment_alone(tmp_path):
    environment = dict(os.environ)
    args = to_grpo_config(smoke(tmp_path, wandb_log=True, wandb_project="p"), num_processes=1)
    assert args.report_to == ["wandb"] and dict(os.environ) == environment


def test_wandb_offline_run_holds_the_step_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "not-this-one")  # TrainConfig.wandb_project wins
    summary = Trainer(smoke(tmp_path, wandb_log=True, wandb_project="nanopost-test")).run(tasks="addition")

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [record.run for record in records if record.HasField("run")]
    assert run.project == "nanopost-test" and run.display_name == "run"
    assert any(record.HasField("exit") for record in records)  # the run was finished, not left open
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.HasField("history")
    ]
    steps = {row["train/global_step"]: row for row in history if "train/loss" in row}
    rows = read_rows(summary.log_path)[1:]
    assert sorted(steps) == [row["step"] for row in rows] == [1, 2]
    for row in rows:
        logged = steps[row["step"]]
        assert logged["train/reward"] == pytest.approx(row["reward_mean"])
        assert logged["train/loss"] == pytest.approx(row["loss"])
        assert logged["train/learning_rate"] == pytest.approx(row["lr"])


# --- checkpoint and resume
def cli(out_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "nanopost_trl.train", "--preset", "TINY_SMOKE", "--num_steps", "12", "--save_every", "3",
        "--lr_schedule", "linear", "--run_name", "r", "--out_dir", str(out_dir), *args,
    ]  # fmt: skip


SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # on a shared 2-core box, 2 OpenMP threads can be 20x slower


def run_cli(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cli(out_dir, *args), capture_output=True, text=True, cwd=REPO, env=SINGLE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def untimed(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if not key.endswith("_s")} for row in rows]


@pytest.mark.slow
def test_killed_run_resumes_from_its_latest_checkpoint_as_if_never_stopped(tmp_path):
    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    with open(tmp_path / "killed.log", "w") as log:
        first = subprocess.Popen(cli(killed), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=SINGLE_THREAD)
        deadline = time.monotonic() + 300
        while not list(killed.glob("r/checkpoint-*/trainer_state.json")):  # written last: the checkpoint is whole
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert 3 <= max(row["step"] for row in read_rows(killed / "r.jsonl")) < 12

    resumed = run_cli(killed, "--resume", "latest")
    rows = read_rows(killed / "r.jsonl")
    assert [row["step"] for row in rows] == list(range(13))  # every step exactly once
    run_cli(uninterrupted)
    # the same rewards, losses, grad norms, (linearly decaying) lr and eval as a run never stopped: the weights,
    # optimizer, scheduler, RNG and data order all came back from the checkpoint
    assert untimed(rows) == untimed(read_rows(uninterrupted / "r.jsonl"))
    before = rows[0]["eval_addition_accuracy"]
    assert f"held-out greedy accuracy [addition]: {before:.1%} -> " in resumed.stdout  # before: from the log
    assert (killed / "r" / "final" / "model.safetensors").exists()


# --- DeepSpeed
@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_processes(tmp_path):
    pytest.importorskip("deepspeed")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "deepspeed_zero2.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
        "-m", "nanopost_trl.train", "--preset", "TINY_SMOKE", "--save_every", "2",
        "--out_dir", str(tmp_path), "--run_name", "zero2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in read_rows(tmp_path / "zero2.jsonl")] == [0, 1, 2]
    shards = list((tmp_path / "zero2" / "checkpoint-2").glob("global_step2/zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2  # ZeRO: the optimizer state is partitioned over the two processes
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "zero2" / "final")
    base = embedded_model()
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters(), strict=True))
