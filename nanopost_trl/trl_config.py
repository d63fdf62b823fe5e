"""TrainConfig and TRL's GRPOConfig: TRL's names on our side (`TRL_NAMES`, `trl_meaning`, `translate_trl_names`,
read by the CLI, YAML and `Preset.make`), and a TrainConfig as the GRPOConfig of its run (`to_grpo_config`), with the
options TRL applies as they are (`TrainConfig.trl_args`) on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from nanopost_trl.config import TrainConfig, TrlOptions
from nanopost_trl.launch import micro_batches
from nanopost_trl.run_paths import output_paths
from nanopost_trl.utils import convert_field


@dataclasses.dataclass(frozen=True)
class TrlName:
    """What a name of TRL's GRPOConfig (or its scripts' ModelConfig) means here: the TrainConfig field it sets, or
    (field None) why it is refused and what to use instead."""

    field: str | None
    why: str = ""
    convert: Callable[[Any], Any] | None = None  # TRL's value -> ours, where the two differ in form


def _reports_to_wandb(report_to: str | list[str]) -> bool:
    """TRL's `report_to` ("wandb", ["wandb"], "none") as `wandb_log`: W&B is the one integration a run reports to."""
    integrations = {report_to} if isinstance(report_to, str) else set(report_to)
    if not integrations <= {"wandb", "none"}:
        raise ValueError(
            f"report_to={report_to!r}: a run reports to W&B only (wandb_log); every run also writes "
            "out_dir/{run_name}.jsonl"
        )
    return "wandb" in integrations


_SET_FROM_BATCH = "set from prompts_per_step x responses_per_prompt (one generation batch per optimizer step)"
# TRL's names that differ from ours; TRL names equal to ours (learning_rate, warmup_steps, weight_decay, max_grad_norm,
# temperature, top_p, num_iterations, seed, run_name, bf16, gradient_checkpointing, use_vllm, vllm_mode, vllm_server_*,
# push_to_hub, hub_model_id, lora_*, log_completions, num_completions_to_print, mask_truncated_completions,
# max_tool_calling_iterations, use_liger_kernel) are TrainConfig fields already.
TRL_NAMES: dict[str, TrlName] = {
    **{
        trl_name: TrlName(field)
        for trl_name, field in {
            "num_generations": "responses_per_prompt",
            "max_completion_length": "max_new_tokens",
            "beta": "kl_coef",
            "per_device_train_batch_size": "micro_batch_size",
            "max_steps": "num_steps",
            "lr_scheduler_type": "lr_schedule",
            "output_dir": "out_dir",
            "activation_checkpointing": "gradient_checkpointing",
            "hub_private_repo": "hub_private",
            "save_steps": "save_every",
            "eval_steps": "eval_every",
            "per_device_eval_batch_size": "eval_batch_size",
            "model_name_or_path": "model",
        }.items()
    },
    "report_to": TrlName("wandb_log", convert=_reports_to_wandb),
    **{
        trl_name: TrlName(None, why)
        for trl_name, why in {
            "gradient_accumulation_steps": f"{_SET_FROM_BATCH} / processes / micro_batch_size: set --micro_batch_size",
            "generation_batch_size": f"{_SET_FROM_BATCH}: set --prompts_per_step",
            "steps_per_generation": f"{_SET_FROM_BATCH}: set --prompts_per_step",
            "num_train_epochs": "a run is counted in optimizer steps: set --num_steps",
            "loss_type": "the loss is chosen with --loss (see --list) and shaped with --loss_args, e.g. "
            "--loss grpo --loss_args aggregation=token_mean (TRL's bnpo) or aggregation=constant (dr_grpo)",
            "logging_steps": "every step is logged (out_dir/{run_name}.jsonl)",
            "save_strategy": "checkpoints every --save_every N steps (0: the final model only)",
            "eval_strategy": "held-out greedy eval every --eval_every N steps (0: start and end only)",
            "num_generations_eval": "held-out eval is greedy, one completion per prompt; --eval_pass_k K samples K",
            "use_cpu": "set from whether a GPU is visible",
            "fp16": "mixed precision is bf16 only: --bf16",
            "use_peft": "LoRA is on when --lora_r > 0",
            "dataset_name": "the data comes from --tasks (see --list), or Trainer.run(tasks=...) from Python",
        }.items()
    },
}


def trl_meaning(name: str) -> TrlName | None:
    """What TRL's GRPOConfig name `name` means here: `TRL_NAMES`, else a GRPOConfig option passed to TRL as it is
    (`trl_args`) or refused with its reason (`passthrough_refusal`); None: not TRL's name, or ours too."""
    from trl import GRPOConfig

    if name in TRL_NAMES:
        return TRL_NAMES[name]
    if name in TrainConfig.__dataclass_fields__ or name not in GRPOConfig.__dataclass_fields__:
        return None
    why = passthrough_refusal(name)
    return TrlName(None, why) if why else TrlName("trl_args")


def passthrough_refusal(name: str) -> str | None:
    """Why GRPOConfig's option `name` cannot go to TRL as it is (`trl_args`), or None when it can: it is ours (under
    its name or another), a loss option (the loss's field), or one `to_grpo_config` sets from the TrainConfig."""
    from trl import GRPOConfig

    from nanopost_trl import trl_bridge

    if name not in GRPOConfig.__dataclass_fields__:
        return "not a GRPOConfig option"
    if name in TrainConfig.__dataclass_fields__ or (name in TRL_NAMES and TRL_NAMES[name].field):
        return f"set it as --{TRL_NAMES[name].field if name in TRL_NAMES else name}"
    if name in TRL_NAMES:
        return TRL_NAMES[name].why
    if name in trl_bridge.LOSS_OPTIONS:
        return f"the loss's option: --loss_args {trl_bridge.LOSS_OPTIONS[name]}=VALUE"
    if name in grpo_settings(TrainConfig(run_name="any"), num_processes=1):
        return "set from the TrainConfig (to_grpo_config)"
    return None


def translate_trl_names(settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`settings` with TRL's names (`trl_meaning`) replaced by our TrainConfig fields, or gathered into `trl_args`
    (the options TRL applies as they are), and one line per replacement saying where it went. Every refused name,
    or a TRL name and ours setting one field to different values, is reported at once in one ValueError."""
    translated, notes, refused = {}, [], []
    meanings = {name: trl_meaning(name) for name in settings}
    for name, value in settings.items():
        if meanings[name] is None:
            translated[name] = value
    for trl_name, value in settings.items():
        meaning = meanings[trl_name]
        if meaning is None:
            continue
        if meaning.field is None:
            refused.append(f"{trl_name} ({meaning.why})")
        elif meaning.field == "trl_args":
            from trl import GRPOConfig

            options = translated.setdefault("trl_args", TrlOptions(translated.get("trl_args", {})))
            options[trl_name] = convert_field(GRPOConfig, trl_name, value)
            notes.append(f"{trl_name} is TRL's option: passed to GRPOConfig as {trl_name}={options[trl_name]!r}")
        else:
            ours = convert_field(TrainConfig, meaning.field, meaning.convert(value) if meaning.convert else value)
            field_name = meaning.field
            if field_name in translated and convert_field(TrainConfig, field_name, translated[field_name]) != ours:
                refused.append(
                    f"{trl_name}={value!r} (TRL's name for {field_name}) and {field_name}={translated[field_name]!r} "
                    "set the same field to different values: give one"
                )
                continue
            translated[field_name] = ours
            notes.append(f"{trl_name} is TRL's name for {field_name}: set {field_name}={ours!r}")
    if refused:
        raise ValueError(f"TRL's GRPOConfig names not set here: {'; '.join(refused)}")
    return translated, notes


# TrainConfig fields that reach GRPOConfig in another form (`to_grpo_config`: paths, batch split, checkpoint and eval
# schedules, the Hub push done by `Trainer.run`) or not at all (kl_coef is the loss's)
NOT_VERBATIM = ("out_dir", "run_name", "micro_batch_size", "save_every", "eval_every", "eval_batch_size", "push_to_hub",
                "hub_private", "kl_coef")  # fmt: skip


def grpo_disagreements(cfg: TrainConfig, args: Any) -> list[str]:
    """The TrainConfig fields that GRPOConfig holds too (under its name or TRL's, `TRL_NAMES`), set in `cfg` away
    from TrainConfig's default and to another value in `args`: beside TRL's own config they would be ignored."""
    defaults = TrainConfig()
    trl_name = {meaning.field: name for name, meaning in TRL_NAMES.items() if meaning.field and not meaning.convert}
    disagreements = []
    for name in TrainConfig.__dataclass_fields__:
        grpo_name = trl_name.get(name, name)
        unset = getattr(cfg, name) == getattr(defaults, name)
        if grpo_name not in type(args).__dataclass_fields__ or name in NOT_VERBATIM or unset:
            continue
        ours, theirs = getattr(cfg, name), getattr(args, grpo_name)
        if str(ours) != str(getattr(theirs, "value", theirs)):  # enums (lr_scheduler_type) by value
            disagreements.append(f"{name}={ours!r} (GRPOConfig {grpo_name}={theirs!r})")
    return disagreements


def to_grpo_config(cfg: TrainConfig, *, num_processes: int, reward_weights: list[float] | None = None):
    """The one place a TrainConfig becomes TRL's GRPOConfig.

    One optimizer step per generation batch: each process generates `completions_per_step / num_processes`
    completions and back-propagates them `micro_batch_size` at a time (gradient accumulation covers the rest).
    `beta` stays TRL's default: the loss owns its KL coefficient, and the adapter loads the reference model exactly
    when the loss reads it (`trl_bridge.with_reference`).
    With `wandb_log`, TRL reports to W&B; `Trainer.run` opens the run in `cfg.wandb_project` (no environment change).
    """
    from trl import GRPOConfig

    if refused := [f"{name} ({why})" for name in cfg.trl_args if (why := passthrough_refusal(name))]:
        raise ValueError(f"TrainConfig.trl_args: not passed to TRL as they are: {'; '.join(refused)}")
    return GRPOConfig(**grpo_settings(cfg, num_processes=num_processes, reward_weights=reward_weights), **cfg.trl_args)


def grpo_settings(cfg: TrainConfig, *, num_processes: int, reward_weights: list[float] | None = None) -> dict[str, Any]:
    """The GRPOConfig options a TrainConfig sets (`to_grpo_config` adds `cfg.trl_args`, TRL's own, on top)."""
    import torch

    micro_batch, accumulation = micro_batches(cfg, num_processes)
    return dict(
        output_dir=str(output_paths(cfg)["checkpoints"]),
        run_name=cfg.run_name,
        max_steps=cfg.num_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        num_generations=cfg.responses_per_prompt,
        generation_batch_size=cfg.completions_per_step,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_iterations=cfg.num_iterations,
        mask_truncated_completions=cfg.mask_truncated_completions,
        max_tool_calling_iterations=cfg.max_tool_calling_iterations,
        reward_weights=reward_weights,
        seed=cfg.seed,
        ddp_timeout=cfg.collective_timeout_s,
        logging_steps=1,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        report_to=["wandb"] if cfg.wandb_log else "none",
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        use_vllm=cfg.use_vllm,
        use_liger_kernel=cfg.use_liger_kernel,
        vllm_mode=cfg.vllm_mode,
        vllm_server_host=cfg.vllm_server_host,
        vllm_server_port=cfg.vllm_server_port,
        vllm_server_base_url=cfg.vllm_server_base_url,
        vllm_group_port=cfg.vllm_group_port,
        vllm_server_timeout=cfg.vllm_server_timeout,
        push_to_hub=False,  # `Trainer.run` pushes the final model/adapter with its card (nanopost_trl.hub), once
        hub_model_id=cfg.hub_model_id,
        log_completions=cfg.log_completions,
        num_completions_to_print=cfg.num_completions_to_print,
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun/`accelerate launch --multi_gpu` use gloo on CPU
        dataloader_pin_memory=torch.cuda.is_available(),
        # every trainable weight is in each step's graph (a gated loss's skipped rows still run the forward, and a
        # process that keeps no row runs one with zero weight): no extra autograd traversal per step under DDP
        ddp_find_unused_parameters=False,
    )
