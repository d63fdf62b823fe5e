"""Run outputs: `out/{run_name}.jsonl` (a row per optimizer step, append-only), `out/{run_name}-config.json`, the
held-out eval, the short per-step console line, and the end-of-run summary."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from nanopost_trl import base
from nanopost_trl.checkpoints import DiskError, disk_error_kind, disk_error_message
from nanopost_trl.config import TrainConfig
from nanopost_trl.evaluation import held_out_eval
from nanopost_trl.run_paths import run_files
from nanopost_trl.utils import read_rows, text_of

if TYPE_CHECKING:
    from trl import GRPOTrainer

# TRL's log keys -> the column names of the run log; other keys keep their name with "/" -> "_".
RENAMED_KEYS = {
    "reward": "reward_mean",
    "completions/mean_length": "response_len_mean",
    "learning_rate": "lr",
    "step_time": "step_time_s",
}
DROPPED_KEYS = {"epoch", "num_tokens"}


def runtime_info(trainer: GRPOTrainer) -> dict[str, Any]:
    """What the run actually runs on: processes, device, parameter dtype, mixed precision, DeepSpeed stage, FSDP
    version, LoRA."""
    accelerator = trainer.accelerator
    device = accelerator.device
    model = accelerator.unwrap_model(trainer.model)
    return {
        "num_processes": accelerator.num_processes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision,
        "deepspeed_stage": accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
        "lora": hasattr(model, "peft_config"),
    }


def write_run_config(path: Path, cfg: TrainConfig, loss_fn: base.LossFn, tasks: Any, runtime: dict[str, Any]) -> None:
    """Record the full TrainConfig, the loss (class and fields), the tasks, the runtime (`runtime_info`) and package
    versions."""
    import accelerate
    import transformers
    import trl

    loss_args = dataclasses.asdict(loss_fn) if dataclasses.is_dataclass(loss_fn) else {}
    task_names = [tasks] if isinstance(tasks, str) else sorted({t if isinstance(t, str) else t.name for t in tasks})
    record = {
        "run_name": cfg.run_name,
        "config": cfg.to_dict(),
        "loss": {
            "name": type(loss_fn).__name__.removesuffix("Loss").lower(),
            "class": f"{type(loss_fn).__module__}.{type(loss_fn).__qualname__}",
            "args": loss_args,
        },
        "tasks": task_names,
        "runtime": runtime,
        "versions": {m.__name__: m.__version__ for m in (torch, trl, transformers, accelerate)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so a kill mid-run loses at most the line being written. A write that fails
    (a full disk) is cut back off, so the log never holds a partial row, and stops the run with a one-line
    `DiskError`."""
    with open(path, "a") as f:
        end = f.tell()
        try:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as error:
            f.truncate(end)
            kind = disk_error_kind(error)
            if kind is None:
                raise
            message = f"{disk_error_message(kind, path, None)}; the log ends at the row before step {row['step']}"
            raise DiskError(message) from error


def truncate_after(path: Path, step: int) -> None:
    """On resume from a checkpoint at `step`, drop later rows (they will be logged again) by an atomic rewrite."""
    if not path.exists():
        return
    kept = [row for row in read_rows(path) if row["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def to_row(step: int, logs: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step}
    for key, value in logs.items():
        if key not in DROPPED_KEYS and value is not None:
            row[RENAMED_KEYS.get(key, key.replace("rewards/", "reward_").replace("/", "_"))] = value
    if "step_time_s" in row and "generation_time_s" in row:
        row["learning_time_s"] = row["step_time_s"] - row["generation_time_s"]
    return row


@dataclasses.dataclass
class RunSummary:
    """What `Trainer.run` returns: where the outputs are and how the run went."""

    run_name: str
    log_path: Path
    config_path: Path
    model_dir: Path | None
    eval_before: dict[str, float]  # per task: greedy accuracy ("{task}"), pass@k ("{task} pass@k"), tool-call rate
    eval_after: dict[str, float]
    reward_first: float | None  # mean reward over the first `reward_window` steps
    reward_last: float | None  # mean reward over the last `reward_window` steps
    final_metrics: dict[str, Any]
    reward_window: int = 10  # up to 10 steps, at most half the run (so first and last do not overlap)

    def __str__(self) -> str:
        lines = [f"run {self.run_name}"]
        for key in sorted(self.eval_after):
            task, _, metric = key.partition(" ")
            before = self.eval_before.get(key, float("nan"))
            lines.append(
                f"  held-out {metric or 'greedy accuracy'} [{task}]: {before:.1%} -> {self.eval_after[key]:.1%}"
            )
        if self.reward_first is not None:
            lines.append(
                f"  train reward (mean of first -> last {self.reward_window} steps): "
                f"{self.reward_first:.3f} -> {self.reward_last:.3f}"
            )
        lines.append(f"  log: {self.log_path}   config: {self.config_path}")
        if self.model_dir is not None:
            lines.append(f"  model: {self.model_dir}")
        return "\n".join(lines)


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar without its dict dump on every log; `RunLogger` prints a short line instead."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class RunLogger(TrainerCallback):
    """Writes the run log (main process), calls the held-out eval on every process, prints per-step lines."""

    def __init__(self, trainer, log_path: Path, eval_instances: Sequence[base.TaskInstance], resume: bool) -> None:
        self.trainer = trainer
        self.log_path = Path(log_path)
        self.eval_instances = list(eval_instances)
        self.resume = resume
        self.pending_eval: dict[str, float] = {}
        self.latest_eval: dict[str, float] = {}  # the latest held-out eval and its "step", for the per-step line
        self.eval_before: dict[str, float] = {}
        self.eval_after: dict[str, float] = {}
        self.is_main = trainer.accelerator.is_main_process

    def evaluate(self) -> dict[str, float]:
        """The held-out eval over all processes (`evaluation.held_out_eval`)."""
        return held_out_eval(self.trainer, self.eval_instances, progress=self.is_main)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self.resume:
                truncate_after(self.log_path, state.global_step)
                first = read_rows(self.log_path)[:1]
                if first and first[0]["step"] == 0:  # the start-of-run eval, for the summary's before -> after
                    self.eval_before = {k: v for k, v in first[0].items() if k.startswith("eval_")}
            elif self.log_path.exists():
                self.log_path.unlink()  # a fresh run of the same name starts a fresh log
        if state.global_step == 0 and self.eval_instances:
            self.eval_before = self.evaluate()
            if self.is_main:
                append_row(self.log_path, {"step": 0, **self.eval_before})
                self.latest_eval = {"step": 0, **self.eval_before}
                tqdm.write(_format_eval(0, self.eval_before))

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.cfg.eval_every
        if self.eval_instances and (state.global_step == state.max_steps or (every and state.global_step % every == 0)):
            self.pending_eval = self.evaluate()
            self.eval_after = self.pending_eval

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs or "loss" not in logs:
            return
        row = {**to_row(state.global_step, logs), **self.pending_eval}
        if self.pending_eval:
            self.latest_eval = {"step": row["step"], **self.pending_eval}
        self.pending_eval = {}
        append_row(self.log_path, row)
        tqdm.write(step_line(row, self.trainer.loss_fn.headline_metrics, self.latest_eval))

    def summary(self, model_dir: Path | None) -> RunSummary:
        rows = read_rows(self.log_path) if self.log_path.exists() else []
        rewards = [row["reward_mean"] for row in rows if "reward_mean" in row]
        cfg = self.trainer.cfg
        window = max(1, min(10, len(rewards) // 2))
        return RunSummary(
            run_name=cfg.run_name,
            log_path=self.log_path,
            config_path=run_files(self.log_path.parent, cfg.run_name)["config"],
            model_dir=model_dir,
            eval_before=_strip_eval(self.eval_before),
            eval_after=_strip_eval(self.eval_after),
            reward_first=sum(rewards[:window]) / window if rewards else None,  # window <= len(rewards)
            reward_last=sum(rewards[-window:]) / window if rewards else None,
            final_metrics=rows[-1] if rows else {},
            reward_window=window,
        )


def step_line(row: dict[str, Any], headline_metrics: Sequence[str], latest_eval: dict[str, Any]) -> str:
    """The per-step console line: what tells progress (reward, KL to the reference, the loss's headline metrics,
    grad norm, completion length, the latest held-out accuracy). The loss value itself is in the run log only: for
    on-policy GRPO-style surrogates it is ~0 by construction (group-normalised advantages average to zero)."""
    parts = [f"step {row['step']:>5}", f"reward {row.get('reward_mean', float('nan')):.3f}"]
    kl = row.get("loss_kl_ref", row.get("loss_kl"))
    if kl is not None:
        parts.append(f"kl {kl:.4f}")
    parts += [f"{name} {row[f'loss_{name}']:.3f}" for name in headline_metrics if f"loss_{name}" in row]
    parts += [f"grad {row.get('grad_norm', float('nan')):.3f}", f"len {row.get('response_len_mean', float('nan')):.1f}"]
    accuracies = [
        f"{key.removeprefix('eval_').removesuffix('_accuracy')} {value:.1%}"
        for key, value in latest_eval.items()
        if key.startswith("eval_") and key.endswith("_accuracy")
    ]
    if accuracies:
        parts.append(f"held-out {', '.join(accuracies)} @{latest_eval['step']}")
    line = "  ".join(parts) + f"  {row.get('step_time_s', float('nan')):.2f}s"
    return line + (f"  ! {trouble}" if (trouble := step_trouble(row)) else "")


# what went wrong in a step, by run-log column: said at the end of its console line
TROUBLE_COUNTS = {
    "reward_errors": "reward errors (scored 0)",
    "reward_timeouts": "reward time-outs (scored 0)",
    "tool_errors": "tool errors",
    "tool_timeouts": "tool time-outs",
    "tool_overlong": "tool results dropped (past max_completion_length)",
}


def step_trouble(row: dict[str, Any]) -> str:
    """'3 reward errors (scored 0), update skipped (non-finite loss)' for a step with trouble, else ''."""
    said = [f"{row[key]:g} {what}" for key, what in TROUBLE_COUNTS.items() if row.get(key)]
    if row.get("nonfinite_skipped"):
        said.append("update skipped (non-finite loss)")
    return ", ".join(said)


def _strip_eval(metrics: dict[str, float]) -> dict[str, float]:
    """`eval_{task}_accuracy` -> `{task}`, `eval_{task}_pass@k` -> `{task} pass@k`, `eval_{task}_tool_calls` ->
    `{task} tool_calls`."""
    return {re.sub(r"_(pass@\d+|tool_calls)$", r" \1", key.removeprefix("eval_").removesuffix("_accuracy")): value
            for key, value in metrics.items()}  # fmt: skip


def _format_eval(step: int, metrics: dict[str, Any]) -> str:
    return f"eval @ {step}: " + ", ".join(
        f"{key.removeprefix('eval_')} {value:.1%}" for key, value in metrics.items() if key.startswith("eval_")
    )


class CompletionsLog:
    """`path` (out/{run_name}-completions.jsonl): `per_step` of each step's completions, evenly spaced over its rows
    so that they span its groups, one JSON line each: step, task, prompt, completion, reward, advantage. Append-only;
    its first step's `record` drops the rows of that step and later ones (a resumed run logs them again; a fresh run
    of the same name starts at step 1, so the old file empties)."""

    def __init__(self, path: Path | None, per_step: int) -> None:
        """`path` None (a trainer built outside `Trainer.run`, with no run name): nothing is written."""
        self.path, self.per_step = path, per_step if path is not None else 0
        self.started = False

    def record(
        self,
        step: int,
        tasks: Sequence[str],
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rewards: torch.Tensor,
        advantages: torch.Tensor,
    ) -> None:
        """Write the sampled rows of `step`; of chat prompts and completions, the last message's text, and of a
        multi-turn episode (tool calls) also its messages, calls and results included, under "episode"."""
        if not self.per_step:
            return
        if not self.started:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_after(self.path, step - 1)
            self.started = True
        for row in range(0, len(completions), math.ceil(len(completions) / self.per_step)):
            append_row(
                self.path,
                {
                    "step": step,
                    "task": tasks[row],
                    "prompt": text_of(prompts[row]),
                    "completion": text_of(completions[row], role="assistant"),
                    "reward": rewards[row].item(),
                    "advantage": advantages[row].item(),
                }
                | (
                    {"episode": completions[row]}
                    if isinstance(completions[row], list) and len(completions[row]) > 1
                    else {}
                ),  # fmt: skip
            )
