"""`Trainer(cfg).run(loss_fn, tasks)`: one RL post-training run, read top to bottom as a script.

config -> data -> model -> trainer (`nanopost_trl.adapter.NanopostGRPOTrainer`, TRL's GRPOTrainer with the LossFn)
-> train (with the run log and held-out eval as a callback) -> save / push. Returns a `RunSummary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from nanopost_trl import base, chat_templates, checkpoints, faults, hub, memory, tools, trl_bridge
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import TrainConfig
from nanopost_trl.launch import check_vllm_server
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import (
    check_chat_template,
    check_model,
    load_model_and_tokenizer,
    lora_config,
    with_supported_precision,
)
from nanopost_trl.rewards import RewardAdapter, reward_components
from nanopost_trl.run_log import QuietProgressCallback, RunLogger, RunSummary, runtime_info, write_run_config
from nanopost_trl.run_paths import output_paths, run_to_resume
from nanopost_trl.tasks import resolve_tasks, tasks_label
from nanopost_trl.trl_config import to_grpo_config


class Trainer:
    """`Trainer(cfg).run(loss_fn=Loss.DG.make(), tasks="gsm8k")`: one RL post-training run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def run(
        self,
        loss_fn: base.LossFn | None = None,
        tasks: str | Sequence[str] | Sequence[base.TaskInstance] = "addition",
        reward_fn: Callable | None = None,
        eval_tasks: str | Sequence[str] | Sequence[base.TaskInstance] | None = None,
        resume: str | bool | None = None,
    ) -> RunSummary:
        """Train with `loss_fn` (default GRPO) on `tasks`, scored by `reward_fn` (default: each task's eval_fn).

        Held-out eval uses the tasks' test splits, or `eval_tasks` when given. `resume` = True (latest checkpoint of
        this run) or a checkpoint path; after an elastic restart (torchrun), True by itself when a checkpoint exists.
        SIGTERM / SIGUSR1 finish the step, save a checkpoint and raise `faults.Preempted` (`nanopost_trl.faults`).
        """
        preemption = faults.Preemption()
        with preemption.handlers_installed():
            return self._run(loss_fn, tasks, reward_fn, eval_tasks, resume, preemption)

    def _run(self, loss_fn, tasks, reward_fn, eval_tasks, resume, preemption: faults.Preemption) -> RunSummary:
        # config
        if not isinstance(loss_fn, base.LossFn | type(None)):
            raise TypeError(f"loss_fn must be a nanopost_trl.base.LossFn, got {type(loss_fn).__name__}")
        loss_fn = fill_from_config(loss_fn or GRPOLoss(), self.cfg)
        faults.init_restarted_group(self.cfg.collective_timeout_s)
        state = PartialState(
            cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=self.cfg.collective_timeout_s)
        )  # the first PartialState makes the process group: with the bounded collective time-out
        if resume is None and faults.elastic_restart():
            resume = self.resume_after_restart(state.is_main_process)
        if resume is True and self.cfg.run_name is None:  # the newest run in out_dir with a checkpoint
            self.cfg = dataclasses.replace(self.cfg, run_name=run_to_resume(self.cfg))
        cfg = self.cfg = with_run_name(with_supported_precision(self.cfg), loss_fn, tasks)
        memory.warn_if_over_device(cfg, loss_fn.uses_reference)  # on a GPU: the planner's verdict before loading
        paths = output_paths(cfg)
        set_seed(cfg.seed)
        # data
        train_instances = resolve_tasks(tasks, "train", cfg.data_dir)
        eval_instances = eval_subset(resolve_tasks(eval_tasks or tasks, "test", cfg.data_dir), cfg.eval_size)
        if eval_tasks is None and not isinstance(tasks, str) and isinstance(tasks[0], base.TaskInstance):
            warnings.warn(
                f"no eval_tasks: the 'held-out' eval scores the first {len(eval_instances)} training instances "
                "(a list of TaskInstance has no test split); pass eval_tasks=[...] for a real held-out score",
                stacklevel=3,
            )
        components = reward_components(reward_fn)
        # model
        check_before_loading(cfg, state.is_main_process)
        model, tokenizer = load_model_and_tokenizer(cfg)
        check_chat_template(tokenizer, [*train_instances, *eval_instances], cfg.model)
        train_tools, environment_factory = tools.run_tools(train_instances)
        uses_tools = any(instance.uses_tools for instance in [*train_instances, *eval_instances])
        chat_templates.set_up_chat_template(tokenizer, cfg.chat_template, cfg.model, uses_tools)
        # trainer
        trainer = NanopostGRPOTrainer(
            model=model,
            reward_funcs=[RewardAdapter(fn, train_instances) for fn, _ in components],
            args=to_grpo_config(
                cfg,
                num_processes=state.num_processes,
                reward_weights=[weight for _, weight in components],
            ),
            train_dataset=build_dataset(train_instances),
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
            tools=train_tools,
            environment_factory=environment_factory,
            loss_fn=loss_fn,
            instances=train_instances,
            cfg=cfg,
        )
        logger = RunLogger(trainer, paths["log"], eval_instances, resume=bool(resume))
        trainer.add_callback(logger)
        trainer.add_callback(preemption)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(QuietProgressCallback)
        main = trainer.accelerator.is_main_process
        if main:
            write_run_config(paths["config"], cfg, loss_fn, tasks, runtime_info(trainer))
        # train
        with (
            trl_bridge.known_warnings_silenced(),
            wandb_run(cfg, main),
            faults.peers_watched(trainer.accelerator, cfg.collective_timeout_s),
        ):
            checkpoint = resume_checkpoint(paths["checkpoints"], main) if resume is True else checked(resume, main)
            trainer.train(resume_from_checkpoint=checkpoint)
            self.grpo_trainer = trainer  # kept for inspection after the run (model, ref_model, state)
            if preemption.stopped_step is not None and trainer.state.global_step < trainer.state.max_steps:
                raise preempted(preemption, paths["checkpoints"], trainer.state, cfg.run_name, main)
            # save / push
            model_dir = paths["checkpoints"] / "final" if cfg.save_final_model or cfg.push_to_hub else None
            summary = logger.summary(model_dir)
            if model_dir is not None:
                save_final_model(trainer, cfg, model_dir, lambda staging: hub.write_model_card(
                    staging, paths["config"], summary))  # fmt: skip
        if model_dir is not None and main and cfg.push_to_hub:
            hub.push(model_dir, cfg.hub_model_id or cfg.run_name, private=cfg.hub_private)
        return summary

    def resume_after_restart(self, main: bool) -> bool | None:
        """After an elastic restart: True (and the run's name) when the run has a complete checkpoint, else None."""
        try:
            self.cfg = dataclasses.replace(self.cfg, run_name=run_to_resume(self.cfg))
        except ValueError:
            if main:
                faults.say(f"elastic restart {faults.elastic_restart()}: no complete checkpoint yet, starting over")
            return None
        if main:
            faults.say(f"elastic restart {faults.elastic_restart()}: resuming run {self.cfg.run_name}")
        return True


def check_before_loading(cfg: TrainConfig, main: bool) -> None:
    """What fails in one line before the model loads: a model name or path that is no model (`check_model`), a vLLM
    server that does not answer (checked by the main process, which TRL's client runs on)."""
    check_model(cfg.model, cfg.gguf_file)
    if cfg.use_vllm and cfg.vllm_mode == "server" and main:
        check_vllm_server(cfg.vllm_server_host, cfg.vllm_server_port, cfg.vllm_server_base_url)


def preempted(
    preemption: faults.Preemption, checkpoints_dir: Path, state, run_name: str, main: bool
) -> faults.Preempted:
    """The `Preempted` to raise after training stopped on a signal, saying (main process) what was saved and how to
    go on."""
    checkpoint = checkpoints_dir / f"checkpoint-{state.global_step}"
    if main:
        faults.say(
            f"stopped by {preemption.signal_name} after step {state.global_step} of {state.max_steps}; saved "
            f"{checkpoint}. Resume with --resume latest --run_name {run_name} (Python: resume=True); exit code "
            f"{faults.PREEMPTED_EXIT_CODE}"
        )
    return faults.Preempted(run_name, str(checkpoint), state.global_step, preemption.signal_name)


def with_run_name(cfg: TrainConfig, loss_fn: base.LossFn, tasks) -> TrainConfig:
    """`cfg`, named `{loss}-{tasks}-s{seed}-{time}` unless it has a run_name."""
    if cfg.run_name is not None:
        return cfg
    loss = type(loss_fn).__name__.removesuffix("Loss").lower()
    return dataclasses.replace(
        cfg, run_name=f"{loss}-{tasks_label(tasks)}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


@contextlib.contextmanager
def wandb_run(cfg: TrainConfig, main: bool) -> Iterator[None]:
    """With `cfg.wandb_log`, on the main process: a W&B run in `cfg.wandb_project` named `cfg.run_name`, which
    transformers' WandbCallback logs into (it starts its own only when none is active), finished at the end."""
    if not (cfg.wandb_log and main):
        yield
        return
    import wandb

    wandb.init(project=cfg.wandb_project, name=cfg.run_name)
    try:
        yield
    finally:
        wandb.finish()  # one W&B run per Trainer.run, flushed (offline mode: the run directory is complete)


def fill_from_config(loss_fn: base.LossFn, cfg: TrainConfig) -> base.LossFn:
    """Replace a dataclass loss's None fields by the same-named TrainConfig fields (kl_coef, max_new_tokens, ...)."""
    if not dataclasses.is_dataclass(loss_fn):
        return loss_fn
    fills = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(loss_fn)
        if getattr(loss_fn, f.name) is None and hasattr(cfg, f.name)
    }
    return dataclasses.replace(loss_fn, **fills) if fills else loss_fn


def build_dataset(instances: Sequence[base.TaskInstance]) -> Dataset:
    """Prompts plus an index into `instances`; TaskInstances (with their graders) cannot live in Arrow."""
    kinds = {type(instance.prompt) for instance in instances}
    if len(kinds) != 1 or not kinds <= {str, list}:
        raise TypeError(
            f"task prompts must all be str or all chat-message lists, got {sorted(k.__name__ for k in kinds)}"
        )
    return Dataset.from_dict({"prompt": [i.prompt for i in instances], "instance_id": list(range(len(instances)))})


def eval_subset(instances: Sequence[base.TaskInstance], size: int) -> list[base.TaskInstance]:
    """The first `size` instances of each task (held-out splits are already shuffled by their seed)."""
    taken: dict[str, int] = {}
    subset = []
    for instance in instances:
        if taken.get(instance.name, 0) < size:
            taken[instance.name] = taken.get(instance.name, 0) + 1
            subset.append(instance)
    return subset


def save_final_model(
    trainer: NanopostGRPOTrainer, cfg: TrainConfig, model_dir: Path, write_card: Callable[[Path], Any]
) -> None:
    """The model, or a LoRA run's adapter (gathered under ZeRO-3); with `merge_adapter_on_save`, the adapter merged
    into a fresh copy of the base model (the training is over: a plain copy, not a ZeRO-3-partitioned one); and the
    model card (`write_card`). Written whole or not at all (`checkpoints.save_atomically`)."""

    def write(staging: Path) -> None:
        trainer.save_model(str(staging))
        if not trainer.accelerator.is_main_process:
            return
        if cfg.merge_adapter_on_save and cfg.lora_r:
            from peft import PeftModel
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            merged = PeftModel.from_pretrained(load_model_and_tokenizer(cfg)[0], staging).merge_and_unload()
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                (staging / name).unlink()
            merged.save_pretrained(staging)
        write_card(staging)

    needed = functools.partial(checkpoints.expected_bytes, trainer, optimizer=False)
    checkpoints.save_atomically(trainer.accelerator, model_dir, write, needed)


def checked(checkpoint: str | None, main: bool) -> str | None:
    """A checkpoint named by path: a one-line error if its files fail its manifest; a warning (main process) if it
    has none (not saved by nanopost_trl: loaded as it is)."""
    if checkpoint is None:
        return None
    problem = checkpoints.verify(Path(checkpoint))
    if problem is not None and (Path(checkpoint) / checkpoints.MANIFEST).exists():
        raise FileNotFoundError(f"cannot resume from {checkpoint}: {problem}")
    if problem is not None and main:
        warnings.warn(f"resuming from {checkpoint} unverified: {problem}", stacklevel=3)
    return checkpoint


def resume_checkpoint(directory: Path, main: bool = True) -> str:
    """The newest checkpoint in `directory` whose files match their manifest (`checkpoints.resume_point`), warning
    (main process) about newer ones skipped; none: a one-line error naming each and why."""
    checkpoint, skipped = checkpoints.resume_point(directory)
    reasons = "; ".join(f"{path.name}: {why}" for path, why in skipped)
    if checkpoint is None:
        raise FileNotFoundError(
            f"no complete checkpoint to resume from in {directory}" + (f" ({reasons})" if reasons else "")
        )
    if skipped and main:
        warnings.warn(
            f"resuming from {checkpoint.name}, skipping newer checkpoints that fail verification ({reasons})",
            stacklevel=3,
        )
    return str(checkpoint)
