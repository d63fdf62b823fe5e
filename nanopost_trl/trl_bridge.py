"""The one module that names TRL's private internals: a TRL upgrade that moves one of them touches this file only.

What the adapter relies on, each checked before training (`check_trl`, `GRPOView`) or on first use:
- `HOOKS`: the private `GRPOTrainer` methods the adapter (`nanopost_trl.adapter`) overrides, with the arguments it
  calls them with. A rename, or a changed signature, stops the run at start-up instead of bypassing the LossFn.
- `PRIVATE_NAMES`: TRL module attributes read here (the fused LM head's switches and kernel) and the trainer's
  `_metrics` store. `fused_head_tiles` switches the fused head and `FusedHeadCheck` verifies, on its first call, that
  TRL's kernel saw the tile width and the positions it was told to; `BackpropCheck` verifies on the first training
  step that the LossFn's loss is the tensor TRL back-propagated (TRL's Liger path, huggingface/trl#7270, broke that).
- `learner_batch` is the only reader of the keys of TRL's generation output; `log_metrics` the only writer of its
  metrics, reduced over processes (mean, sum, or TRL's min/max).
- GRPOConfig's own fields, one table (`grpo_field_kinds`): each honoured by TRL as is, or mapped onto the built-in
  loss (`loss_from_grpo_config`, `LOSS_OPTIONS`, `LOSS_TYPES`); with a loss of the user's, the options it would
  ignore are refused (`check_loss_options`). `grpo_trainer_arguments` reads TRL's constructor arguments by name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import trl
from accelerate.utils import gather_object
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from nanopost_trl import base
from nanopost_trl.losses import CISPOLoss, GRPOLoss, SAPOLoss, VESPOLoss

SUPPORTED_TRL = ">=1.16,<1.17"  # the TRL versions the test suite covers; pyproject.toml declares the same range

# hook -> (positional arguments, keyword arguments) we call it with (besides self); each must bind to TRL's signature.
HOOKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_calculate_rewards": (("inputs", "prompts", "completions", "completion_ids_list"), ()),
    "_generate_and_score_completions": (("inputs",), ()),
    "_compute_loss": (("model", "inputs"), ()),
    "_get_per_token_logps_and_entropies": (
        ("model", "input_ids", "attention_mask", "logits_to_keep"),
        ("batch_size", "compute_entropy", "compute_aux_loss"),
    ),
    "training_step": (("model", "inputs", "num_items_in_batch"), ()),
    "_prepare_inputs": (("generation_batch",), ()),
    "_generate_single_turn": (("prompt_ids", "images", "multimodal_fields", "num_generations"), ("has_tool_images",)),
    "_save_checkpoint": (("model", "trial"), ()),  # transformers.Trainer's: made atomic (nanopost_trl.checkpoints)
}
# module -> the attributes read here. `_use_triton` in trl.trainer.utils decides whether the fused head scores only
# the labelled positions (`compact`); the kernel module's own `_use_triton` decides the Triton kernel.
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "trl.trainer.utils": (
        "_use_triton",
        "_CHUNKED_LOGPROB_CHUNK_SIZE",
        "_ChunkedLogProbFunction",
        "selective_log_softmax",
        "selective_log_softmax_and_entropy",
    ),
    "trl.kernels.chunked_logprob": ("_use_triton",),
    "trl.trainer.grpo_trainer": ("shuffle_sequence_dict",),
}
TRAINER_STATE = ("_metrics", "_last_world_entropy", "entropy_coef")  # GRPOTrainer attributes read or written here
# transformers.Trainer's instance attributes the adapter and its features read, checked after `GRPOTrainer.__init__`
# (`GRPOView`); TRAINING_LOOP_ATTRIBUTES exist only once the training loop runs. GRPOTrainer's own attributes are
# read through the trainer's `grpo` view only (`GRPOView`).
TRAINER_ATTRIBUTES = (
    "accelerator", "args", "is_deepspeed_enabled", "is_fsdp_enabled", "model", "model_wrapped", "processing_class",
    "state", "train_dataset",
)  # fmt: skip
TRAINING_LOOP_ATTRIBUTES = ("current_gradient_accumulation_steps",)
TRANSFORMERS_PATH_ATTRIBUTES = ("generation_config", "generation_kwargs")  # TRL makes them without vLLM only


# --- GRPOConfig's own fields (those it adds to transformers' TrainingArguments, which transformers' Trainer honours
# unchanged), each honoured by TRL as is or mapped onto the built-in loss; `grpo_field_kinds` is the table.
# A loss option: TRL applies it inside its `_compute_loss`, which the LossFn replaces. option -> the built-in loss
# field that does the same (`loss_from_grpo_config`); with a loss_fn of the user's, a non-default value must agree
# with the loss's own field (`check_loss_options`), else it would be ignored.
LOSS_OPTIONS: dict[str, str] = {
    "beta": "kl_coef",
    "epsilon": "eps_low",
    "epsilon_high": "eps_high",
    "delta": "delta",
    "importance_sampling_level": "importance_sampling_level",
    "use_bias_correction_kl": "kl_ratio_correction",
    "top_entropy_quantile": "top_entropy_quantile",
    "entropy_coef": "entropy_coef",
    "off_policy_mask_threshold": "off_policy_mask_threshold",
    "sapo_temperature_pos": "tau_pos",
    "sapo_temperature_neg": "tau_neg",
    "vespo_k_pos": "k_pos",
    "vespo_lambda_pos": "lambda_pos",
    "vespo_k_neg": "k_neg",
    "vespo_lambda_neg": "lambda_neg",
}
# TRL's `loss_type` -> the built-in that reproduces it, and its aggregation (`losses.ops.Aggregation`)
LOSS_TYPES: dict[str, tuple[type[base.LossFn], str]] = {
    "grpo": (GRPOLoss, "seq_mean"),
    "bnpo": (GRPOLoss, "token_mean"),
    "dr_grpo": (GRPOLoss, "constant"),
    "dapo": (GRPOLoss, "step_token_mean"),
    "luspo": (GRPOLoss, "seq_sum_mean"),
    "cispo": (CISPOLoss, "step_token_mean"),
    "sapo": (SAPOLoss, "seq_mean"),
    "vespo": (VESPOLoss, "step_token_mean"),
}
# TRL's adaptive entropy controller: the adapter runs it (`learner.AdaptiveEntropy`) on the loss's entropy_coef field
ADAPTIVE_ENTROPY_OPTIONS = ("use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
                            "entropy_target")  # fmt: skip
# TRL's advantages: honoured for a loss that keeps `LossFn.advantages` (the adapter then trains on TRL's own)
ADVANTAGE_OPTIONS = ("scale_rewards", "multi_objective_aggregation")
# Applied by TRL outside its loss (model loading, generation, vLLM, rewards, batching, reference, logging), unchanged
HONOURED_BY_TRL = (
    "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "disable_dropout",
    "cast_lm_head_to_fp32", "num_generations", "num_generations_eval",
    "max_completion_length", "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of",
    "generation_batch_size", "steps_per_generation", "temperature", "top_p", "top_k", "min_p", "generation_kwargs",
    "chat_template_kwargs", "repetition_penalty", "cache_implementation", "use_vllm", "vllm_mode", "vllm_model_impl",
    "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host",
    "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_tensor_parallel_size", "num_iterations", "reward_weights",
    "mask_truncated_completions", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "max_tool_calling_iterations", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap",
    "log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts",
    "log_completions_hub_repo", "use_transformers_continuous_batching", "transformers_continuous_batching_config",
    "use_transformers_paged",
)  # fmt: skip


def grpo_field_kinds() -> dict[str, str]:
    """GRPOConfig's own fields -> "trl" (honoured by TRL as is), "loss" (mapped onto the built-in loss), "advantages"
    (TRL's advantages, for a loss that keeps the default), "loss_type" or "adaptive_entropy"."""
    kinds = dict.fromkeys(HONOURED_BY_TRL, "trl") | dict.fromkeys(LOSS_OPTIONS, "loss")
    kinds |= dict.fromkeys(ADVANTAGE_OPTIONS, "advantages")
    kinds |= dict.fromkeys(ADAPTIVE_ENTROPY_OPTIONS, "adaptive_entropy")
    return kinds | {"loss_type": "loss_type"}


def own_grpo_fields() -> list[str]:
    """The fields GRPOConfig adds to transformers' TrainingArguments (those transformers' Trainer honours)."""
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(trl.GRPOConfig) if f.name not in inherited]


def grpo_default(option: str) -> Any:
    return trl.GRPOConfig.__dataclass_fields__[option].default


def grpo_value(args: Any, option: str) -> Any:
    """`args.<option>` as TRL reads it (`epsilon_high` None is `epsilon`); `args` None: the default."""
    value = grpo_default if args is None else functools.partial(getattr, args)
    if option == "epsilon_high" and value("epsilon_high") is None:
        return value("epsilon")
    return value(option)


def loss_from_grpo_config(args: trl.GRPOConfig) -> base.LossFn:
    """The built-in loss that reproduces TRL's `_compute_loss` for `args` (its loss_type and every loss option)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {args.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    loss_class, aggregation = LOSS_TYPES[args.loss_type]
    values = {field: grpo_value(args, option) for option, field in LOSS_OPTIONS.items()}
    values |= {"aggregation": aggregation, "max_new_tokens": args.max_completion_length}
    fields = {f.name for f in dataclasses.fields(loss_class)}
    return loss_class(**{name: value for name, value in values.items() if name in fields})


def check_loss_options(args: trl.GRPOConfig, loss_fn: base.LossFn) -> None:
    """With a loss_fn of the user's: every GRPOConfig loss option set away from its default must be read by the loss
    (agree with its field); a ValueError lists every one that would be ignored, with the loss field to use."""
    loss_name = type(loss_fn).__name__
    problems = []
    if args.loss_type != grpo_default("loss_type"):
        problems.append(f"loss_type={args.loss_type!r} picks TRL's loss, which loss_fn={loss_name} replaces")
    for option, field in LOSS_OPTIONS.items():
        value = grpo_value(args, option)
        if value == grpo_value(None, option) or getattr(loss_fn, field, object()) == value:
            continue
        if hasattr(loss_fn, field):
            problems.append(f"{option}={value!r} disagrees with {loss_name}.{field}={getattr(loss_fn, field)!r}")
        else:
            problems.append(f"{option}={value!r} acts inside TRL's loss; {loss_name} has no field {field}")
    if args.use_adaptive_entropy and not hasattr(loss_fn, "entropy_coef"):
        problems.append(f"use_adaptive_entropy=True drives an entropy_coef field, which {loss_name} does not have")
    if declares_advantages(loss_fn):
        for option in ADVANTAGE_OPTIONS:
            if getattr(args, option) != grpo_default(option):
                problems.append(
                    f"{option}={getattr(args, option)!r} shapes TRL's advantages, which {loss_name}.advantages replaces"
                )
    if problems:
        raise ValueError("GRPOConfig options the loss_fn would ignore: " + "; ".join(problems))


def declares_advantages(loss_fn: base.LossFn) -> bool:
    """Whether the loss overrides `advantages` (else the adapter trains on TRL's own advantages)."""
    return type(loss_fn).advantages is not base.LossFn.advantages


def filled_from_grpo_config(loss_fn: base.LossFn, args: trl.GRPOConfig) -> base.LossFn:
    """A dataclass loss with its None fields that a GRPOConfig option sets (kl_coef <- beta, max_new_tokens <-
    max_completion_length) filled in from `args`."""
    if not dataclasses.is_dataclass(loss_fn):
        return loss_fn
    sources = {"kl_coef": "beta", "max_new_tokens": "max_completion_length"}  # the fields where None means "the run's"
    fills = {
        f.name: grpo_value(args, sources[f.name])
        for f in dataclasses.fields(loss_fn)
        if f.name in sources and getattr(loss_fn, f.name) is None
    }
    return dataclasses.replace(loss_fn, **fills) if fills else loss_fn


class UnsupportedTRL(RuntimeError):
    """The installed TRL does not provide what the adapter relies on."""


def supported() -> str:
    return f"nanopost_trl supports trl{SUPPORTED_TRL} (installed: {trl.__version__}); pip install 'trl{SUPPORTED_TRL}'"


def check_trl(trainer_class: type | None = None) -> None:
    """Raise `UnsupportedTRL` unless every hook in `HOOKS` exists on `trainer_class` (default: TRL's GRPOTrainer) and
    accepts the arguments we call it with, and every name in `PRIVATE_NAMES` exists. Warn when they fit but TRL is
    outside the tested range."""
    trainer_class = trainer_class or trl.GRPOTrainer
    for name, (positional, keywords) in HOOKS.items():
        hook = getattr(trainer_class, name, None)
        if not callable(hook):
            raise UnsupportedTRL(
                f"{trainer_class.__name__} has no method {name}, which the adapter overrides; " + supported()
            )
        try:
            inspect.signature(hook).bind(None, *positional, **dict.fromkeys(keywords))
        except TypeError as error:
            raise UnsupportedTRL(
                f"{trainer_class.__name__}.{name}{inspect.signature(hook)} no longer accepts the arguments the adapter "
                f"passes ({', '.join(positional + keywords)}): {error}; " + supported()
            ) from None
    for module_name, names in PRIVATE_NAMES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                raise UnsupportedTRL(f"{module_name} has no {name}, which the adapter relies on; " + supported())
    if Version(trl.__version__) not in SpecifierSet(SUPPORTED_TRL):
        warnings.warn(f"untested TRL version: {supported()}", stacklevel=2)


def entropy_state(trainer: trl.GRPOTrainer) -> tuple[float, float]:
    """(entropy coefficient, last step's entropy) of TRL's adaptive entropy controller, as its checkpoints hold them."""
    return trainer.entropy_coef, trainer._last_world_entropy


def set_entropy_state(trainer: trl.GRPOTrainer, coef: float, last_entropy: float) -> None:
    trainer.entropy_coef, trainer._last_world_entropy = coef, last_entropy


def grpo_trainer_arguments(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TRL's `GRPOTrainer.__init__` arguments by name, as TRL would read them; `args` None is TRL's default
    GRPOConfig (`{model name}-GRPO`). An argument TRL does not take fails here, naming it."""
    try:
        bound = inspect.signature(trl.GRPOTrainer.__init__).bind(None, *args, **kwargs)
    except TypeError as error:
        raise TypeError(f"GRPOTrainer arguments: {error}") from None
    arguments = dict(bound.arguments)
    del arguments["self"]
    if arguments.get("args") is None:
        model = arguments["model"]
        name = model if isinstance(model, str) else model.config._name_or_path
        arguments["args"] = trl.GRPOConfig(f"{name.split('/')[-1]}-GRPO")
    return arguments


def with_reference(args: trl.GRPOConfig, uses_reference: bool) -> trl.GRPOConfig:
    """A copy of `args` whose `beta` makes TRL load the reference model and score it exactly when the loss reads it
    (TRL's beta gates both; the KL coefficient itself is the loss's). Unchanged when beta already agrees."""
    if (args.beta != 0.0) == uses_reference:
        return args
    gated = copy.copy(args)
    gated.beta = 1.0 if uses_reference else 0.0
    return gated


class GRPOView:
    """The GRPOTrainer attributes the adapter and its features read (`trainer.grpo.eos_token_ids`), live from the
    trainer. Built after `GRPOTrainer.__init__`: each listed attribute (below; without vLLM also
    `TRANSFORMERS_PATH_ATTRIBUTES`), `TRAINER_ATTRIBUTES` and `TRAINER_STATE` must exist, so a TRL that renames one
    stops at start-up; a name not listed here is refused on read."""

    aux_loss_enabled: bool
    eos_token_ids: list[int]
    generation_config: Any  # transformers.GenerationConfig of TRL's transformers path
    generation_kwargs: dict[str, Any]
    max_completion_length: int
    num_generations: int
    num_generations_eval: int
    pad_to_multiple_of: int | None
    ref_model: torch.nn.Module | None
    reward_func_names: list[str]
    reward_funcs: list[Any]
    reward_weights: torch.Tensor
    router_aux_loss_coef: float
    temperature: float
    tools: list[Any]
    use_vllm: bool

    def __init__(self, trainer: trl.GRPOTrainer) -> None:
        names = tuple(name for name in GRPOView.__annotations__ if name not in TRANSFORMERS_PATH_ATTRIBUTES)
        if not getattr(trainer, "use_vllm", False):
            names += TRANSFORMERS_PATH_ATTRIBUTES
        for name in (*TRAINER_STATE, *TRAINER_ATTRIBUTES, *names):
            if not hasattr(trainer, name):
                raise UnsupportedTRL(
                    f"GRPOTrainer instances have no {name}, which the adapter relies on; {supported()}"
                )
        self._trainer, self._names = trainer, frozenset(names)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"{name} is not a GRPOTrainer attribute the bridge reads (trl_bridge.GRPOView)")
        return getattr(self._trainer, name)


# --- the metrics store
def metrics_mode(trainer: trl.GRPOTrainer) -> Literal["train", "eval"]:
    """TRL's metrics bucket for the current pass."""
    return "train" if trainer.model.training else "eval"


Reduction = Literal["mean", "sum", "min", "max"]


def trl_reduction(trl_name: str) -> Reduction:
    """How TRL reduces one of its loss metrics over processes: `..._min` by min, `..._max` by max, else mean."""
    return "min" if trl_name.endswith("_min") else "max" if trl_name.endswith("_max") else "mean"


def log_metrics(trainer: trl.GRPOTrainer, values: dict[str, float], reduction: Reduction = "mean") -> None:
    """Append each value, reduced over processes, to TRL's metric of that name (logged at the step's end).

    Every process must call it at the same point. The processes may pass different names (a metric only some of them
    computed): each name is reduced over the processes that passed it, never counting a missing value as 0.
    """
    accelerator = trainer.accelerator
    names = sorted(values)
    if accelerator.num_processes > 1:
        names = sorted(set().union(*gather_object([names])))
    if not names:
        return
    store = trainer._metrics[metrics_mode(trainer)]
    if reduction in ("min", "max"):  # NaN (no such value here) is skipped, as TRL's nanmin / nanmax
        local = torch.tensor([values.get(name, math.nan) for name in names], dtype=torch.float64)
        gathered = accelerator.gather(local.to(accelerator.device)).view(-1, len(names))
        extreme = gathered.nan_to_num(nan=math.inf if reduction == "min" else -math.inf)
        extreme = extreme.amin(dim=0) if reduction == "min" else extreme.amax(dim=0)
        for name, value in zip(names, extreme.tolist(), strict=True):
            store[name].append(value if math.isfinite(value) else math.nan)
        return
    local = [[values[name], 1.0] if name in values else [0.0, 0.0] for name in names]
    totals = torch.tensor(local, dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum").tolist()
    for name, (total, count) in zip(names, totals, strict=True):
        store[name].append(total / count if reduction == "mean" else total)


# --- files TRL ships
def shipped_chat_templates() -> dict[str, Path]:
    """The chat templates TRL ships (name -> .jinja file in TRL's package), without their `_training` variants."""
    files = (Path(trl.__file__).parent / "chat_templates").glob("*.jinja")
    return {path.stem: path for path in sorted(files) if not path.stem.endswith("_training")}


# --- the phases of a step, for the benchmarks that time them apart
def generate_and_score(trainer: trl.GRPOTrainer, rows: list[dict]) -> dict[str, Any]:
    """One generation phase on dataset `rows` (sampling, the tool loop, rewards, advantages), as TRL's training loop
    runs it: `_generate_and_score_completions`."""
    return trainer._generate_and_score_completions(rows)


def trl_logprobs(trainer: trl.GRPOTrainer, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """TRL's own `_get_per_token_logps_and_entropies` on `trainer`, past any override of it (the adapter's)."""
    return trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, *args, **kwargs)


# --- the learner's view of TRL's generation output
def learner_batch(
    trainer: trl.GRPOTrainer, inputs: dict[str, Any], policy_logprobs: torch.Tensor, entropies: torch.Tensor | None
) -> base.LearnerBatch:
    """A `LearnerBatch` from one micro-batch of TRL's generation output (and the adapter's own keys: rewards,
    truncated, reward_components) and the policy's log-probs and entropies."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:  # multi-turn tool calls: tool output tokens carry no loss
        mask = mask * inputs["tool_mask"]
    learner_logprobs = inputs.get("old_per_token_logps")
    rollout_logprobs = policy_logprobs.detach() if learner_logprobs is None else learner_logprobs
    if "sampling_per_token_logps" in inputs:  # vLLM's own; a token it could not score (NaN) keeps the learner's
        sampler_logprobs = inputs["sampling_per_token_logps"]
        rollout_logprobs = torch.where(sampler_logprobs.isnan(), rollout_logprobs, sampler_logprobs)
    training = metrics_mode(trainer) == "train"
    num_items_in_batch = inputs.get("num_items_in_batch")  # TRL always sets it; a hand-built input may not
    micro_batches = trainer.accelerator.num_processes * (trainer.args.steps_per_generation if training else 1)
    return base.LearnerBatch(
        policy_logprobs=policy_logprobs,
        rollout_logprobs=rollout_logprobs,
        reference_logprobs=inputs.get("ref_per_token_logps"),
        advantages=inputs["advantages"].unsqueeze(1),
        rewards=inputs["rewards"],
        loss_mask=torch.cat([inputs["prompt_mask"][:, -1:], mask], dim=1).to(policy_logprobs.dtype),
        entropies=entropies,
        num_items_in_batch=None if num_items_in_batch is None else num_items_in_batch.float(),
        micro_batches_per_step=micro_batches,
        truncated=inputs.get("truncated"),
        reward_components=inputs.get("reward_components"),
        reward_names=tuple(trainer.reward_func_names),
    )


# TRL's per-row generation outputs and how to pad them: key -> (side, pad value; None = the tokenizer's pad id).
PADDED_KEYS: dict[str, tuple[Literal["left", "right"], float | None]] = {
    "prompt_ids": ("left", None),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", None),
    "completion_mask": ("right", 0),
    "tool_mask": ("right", 1),
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 1.0),
}
ROW_KEYS = ("advantages", "rewards", "reward_components", "truncated")  # the adapter's own (B, ...) keys


def concat_generation_outputs(outputs: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Several generation outputs of TRL (each with the adapter's row keys) as one, re-padded to common widths; the
    step's token count is their sum. Multimodal outputs are refused (their image tensors are not per row)."""
    if len(outputs) == 1:
        return outputs[0]
    if unknown := sorted(set().union(*outputs) - set(PADDED_KEYS) - set(ROW_KEYS) - {"num_items_in_batch"}):
        raise ValueError(f"cannot merge generation outputs with {', '.join(unknown)} (multimodal inputs)")
    merged: dict[str, Any] = {}  # in TRL's key order: its shuffle sizes the batch by the first value
    for key in outputs[0]:
        if key == "num_items_in_batch":
            merged[key] = sum(o[key] for o in outputs)
        elif key in ROW_KEYS:
            merged[key] = torch.cat([o[key] for o in outputs])
        elif key in PADDED_KEYS:
            side, value = PADDED_KEYS[key]
            tensors = [o[key] for o in outputs]
            width = max(t.size(1) for t in tensors)
            pad = pad_token_id if value is None else value
            merged[key] = torch.cat(
                [
                    torch.nn.functional.pad(
                        t, (width - t.size(1), 0) if side == "left" else (0, width - t.size(1)), value=pad
                    )
                    for t in tensors
                ]
            )
    return merged


def model_inputs(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion length) of a generation output: prompt and completion side by side."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return input_ids, attention_mask, inputs["completion_ids"].size(1)


def completions(output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_ids, completion_mask) of a generation output, right-padded."""
    return output["completion_ids"], output["completion_mask"]


def prompt_lengths(trainer: trl.GRPOTrainer, output: dict[str, Any]) -> torch.Tensor:
    """Every process's prompt lengths in tokens (float)."""
    return trainer.accelerator.gather(output["prompt_mask"].sum(dim=1)).float()


def keep_rows(trainer: trl.GRPOTrainer, output: dict[str, Any], kept: torch.Tensor | None) -> dict[str, Any]:
    """The output with the completions of rows not `kept` ((B,) bool; None = all) out of the loss and of the step's
    token count, which is recounted over processes (every process calls it)."""
    if kept is not None:
        output["completion_mask"] = output["completion_mask"] * kept.unsqueeze(1)
    loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
    output["num_items_in_batch"] = trainer.accelerator.gather(loss_mask.sum()).sum()
    return output


def select_rows(output: dict[str, Any], rows: torch.Tensor | None) -> dict[str, Any]:
    """The generation output restricted to `rows` (indices; None = all); the token count is left to `keep_rows`."""
    if rows is None:
        return output
    return {key: value[rows] if key in PADDED_KEYS or key in ROW_KEYS else value for key, value in output.items()}


def importance_sampling_ratio(inputs: dict[str, Any]) -> torch.Tensor | None:
    """TRL's vLLM importance-sampling ratio for this micro-batch ((B, T) or (B, 1), detached), if TRL computed one."""
    return inputs.get("importance_sampling_ratio")


# --- the fused LM head
@contextlib.contextmanager
def fused_head_tiles(vocab_chunk: int, check: FusedHeadCheck | None = None) -> Iterator[None]:
    """Inside the block, TRL's fused LM head (`add_fused_lm_head`) runs in tiles `vocab_chunk` vocabulary entries wide
    and projects only the labelled (completion) positions on CPU too.

    Both are module globals of trl.trainer.utils, sized for TRL's Triton kernel: the tile width is 32768, and off
    CUDA/XPU every position is projected (prompt included) to keep tile shapes static for compilers (Neuron). Eager CPU
    needs neither, and its torch fallback keeps several tile-sized fp32 temporaries in the backward
    (benchmarks/RESULTS.md, "Chunked log-probs on a 152k vocabulary"). Log-probs and gradients are unchanged by either
    switch (tested). With `check`, the first call of TRL's kernel inside the block is recorded, for its `verify`.
    """
    import trl.trainer.utils as trl_utils

    use_triton, width, kernel = (
        trl_utils._use_triton,
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE,
        trl_utils._ChunkedLogProbFunction.apply,
    )
    # the fused forward's `compact` (score the labelled positions only): on CPU too; other devices keep TRL's choice
    trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
    kernel_class = trl_utils._ChunkedLogProbFunction
    own_apply = vars(kernel_class).get("apply")  # None: torch.autograd.Function's, inherited
    recording = check is not None and not check.done
    if recording:
        kernel_class.apply = staticmethod(check.recording(kernel))
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = use_triton, width
        if recording and own_apply is None:
            del kernel_class.apply
        elif recording:
            kernel_class.apply = own_apply


@contextlib.contextmanager
def shuffled_by_group(group_size: int) -> Iterator[None]:
    """Inside the block, TRL's generation-batch shuffle (before it splits the batch into micro-batches) permutes
    whole groups of `group_size` consecutive rows instead of rows, so micro-batches hold whole prompt groups."""
    import trl.trainer.grpo_trainer as grpo_module

    from nanopost_trl.shared_prompt import shuffle_whole_groups

    shuffle = grpo_module.shuffle_sequence_dict
    grpo_module.shuffle_sequence_dict = lambda batch: shuffle_whole_groups(batch, group_size)
    try:
        yield
    finally:
        grpo_module.shuffle_sequence_dict = shuffle


def kernel_uses_triton(device: torch.device) -> bool:
    """Whether TRL's fused-head kernel runs its Triton kernel on `device` (else its torch fallback)."""
    from trl.kernels import chunked_logprob

    return chunked_logprob._use_triton(device)


class FusedHeadCheck:
    """Verifies once that TRL's kernel honoured `fused_head_tiles`: the first call saw the configured tile width and
    only the labelled positions. Guards against a TRL that keeps the module globals but stops reading them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []  # (positions projected, tile width) of the recorded kernel call
        self.done = False

    def recording(self, kernel):
        def apply(hidden, weight, bias, labels, temperature, vocab_chunk, *args):
            if not self.seen:
                self.seen.append((hidden.shape[0], vocab_chunk))
            return kernel(hidden, weight, bias, labels, temperature, vocab_chunk, *args)

        return apply

    def verify(self, attention_mask: torch.Tensor, logits_to_keep: int, vocab_chunk: int) -> None:
        """After the first block: `attention_mask` of the rows in TRL's first kernel call (its first chunk)."""
        if self.done:
            return
        self.done = True
        compact = attention_mask.device.type == "cpu" or kernel_uses_triton(attention_mask.device)
        rows, length = attention_mask.shape
        positions = int(attention_mask[:, -logits_to_keep:].sum()) if compact else rows * (length - 1)
        if self.seen != [(positions, vocab_chunk)]:
            raise UnsupportedTRL(
                f"TRL's fused LM head ignored trl.trainer.utils._use_triton / _CHUNKED_LOGPROB_CHUNK_SIZE (expected "
                f"its first kernel call on {positions} positions in {vocab_chunk}-wide tiles, saw {self.seen}); "
                + supported()
            )


def full_logits_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TRL's log-softmax (and entropy) of materialised `logits` at `targets`; padding (mask 0) scores 0."""
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    if compute_entropy:
        return selective_log_softmax_and_entropy(logits, targets, temperature=temperature, row_mask=mask)
    return selective_log_softmax(logits, targets, temperature, mask), None


class BackpropCheck:
    """Verifies once that the loss the LossFn returned is the one back-propagated.

    `watch(loss)` returns the loss with a gradient hook on it (first call only); `verify()` after the first training
    step raises `UnsupportedTRL` if TRL never called our `_compute_loss`, or back-propagated another tensor.
    """

    def __init__(self) -> None:
        self.watched = False
        self.reached = False
        self.done = False

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        if not self.watched and not self.done and loss.requires_grad:
            self.watched = True
            loss.register_hook(self._mark_reached)
        return loss

    def _mark_reached(self, grad: torch.Tensor) -> None:
        self.reached = True

    def verify(self) -> None:
        if self.done:
            return
        self.done = True
        if not self.watched:
            raise UnsupportedTRL(
                "TRL ran a training step without calling the adapter's _compute_loss, so the LossFn was bypassed; "
                + supported()
            )
        if not self.reached:
            raise UnsupportedTRL(
                "the LossFn's loss was not the tensor TRL back-propagated (another loss replaced it); " + supported()
            )


# Warnings TRL's own calls raise that are not the user's concern, by message and by the module that issues them.
KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    # TRL's `disable_gradient_checkpointing` reads the deprecated property on every generation (trl/models/utils.py).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # ... and with gradient_checkpointing=True, TRL's generation wrapper turns it off and on around every generation
    # (trl/models/utils.py `unwrap_model_for_generation`) through the deprecated transformers names.
    (r"`gradient_checkpointing_(enable|disable)` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
]


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Inside the block only, ignore exactly the `KNOWN_WARNINGS` (each matched by message, category and module)."""
    with warnings.catch_warnings():
        for message, category, module in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield
