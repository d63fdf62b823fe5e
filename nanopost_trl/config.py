"""TrainConfig (every knob of a run, documented) and Preset (rough starting points per model and GPU).

`Preset.QWEN_1_5B_1xA100.make(num_steps=2048, kl_coef=0.02)` returns a TrainConfig; `to_grpo_config` maps it onto
TRL's GRPOConfig. Field help strings double as the CLI's `--help`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, NamedTuple

from nanopost_trl.assets import TINY_MODEL
from nanopost_trl.checkpoints import latest_checkpoint
from nanopost_trl.utils import convert_field, make_dataclass

# Vocabulary entries per tile of TRL's fused LM head: TRL's own width where its Triton kernel runs; on its torch
# fallback (CPU) the backward holds several tile-sized fp32 temporaries, so a narrower tile
# (benchmarks/RESULTS.md, "Chunked log-probs on a 152k vocabulary")
TRL_VOCAB_CHUNK, CPU_VOCAB_CHUNK = 32768, 4096
VLLM_MODES = ("colocate", "server")
COMPLETIONS_SUFFIX = "-completions.jsonl"  # out/{run_name}-completions.jsonl, next to the run log


class TrlOptions(dict):
    """GRPOConfig options by TRL's name, from a mapping or a JSON object (the command line's form)."""

    def __init__(self, value: Mapping[str, Any] | str = (), /, **options: Any) -> None:
        super().__init__(json.loads(value) if isinstance(value, str) else value, **options)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. Batch sizes count completions (prompts x responses) unless they say prompts."""

    # --- what to train
    model: str = field(
        default=TINY_MODEL,
        metadata={
            "help": "Hub id, local HF directory, or GGUF file (*.gguf); 'nanopost-tiny' = the embedded model, "
            "'smollm2-135m-instruct' = SmolLM2-135M-Instruct from the `smollm` extra."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file name inside the `model` directory (GGUF models are converted once)."}
    )
    num_steps: int = field(default=200, metadata={"help": "Optimizer steps (one generation batch each)."})
    prompts_per_step: int = field(default=8, metadata={"help": "Distinct prompts per optimizer step (all processes)."})
    responses_per_prompt: int = field(default=8, metadata={"help": "Completions sampled per prompt (group size)."})
    micro_batch_size: int = field(
        default=64, metadata={"help": "Completions per forward/backward per process; the rest is accumulated."}
    )
    # --- optimisation
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (AdamW)."})
    lr_schedule: str = field(
        default="constant_with_warmup",
        metadata={"help": "transformers scheduler name: constant_with_warmup, cosine, linear, ..."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    kl_coef: float = field(
        default=0.0, metadata={"help": "KL-to-reference coefficient for losses whose kl_coef is None; 0 skips ref."}
    )
    # --- sampling
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum completion length in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling for rollouts."})
    # --- tool tasks (tasks whose instances carry tools or an environment; others ignore these)
    max_tool_calling_iterations: int = field(
        default=4, metadata={"help": "Tool-calling rounds per episode, in training and eval (TRL's option)."}
    )
    tool_timeout_s: float = field(
        default=10.0, metadata={"help": "Seconds a tool call may run; past it, the error is the tool's result."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Replace the tokenizer's chat template: a TRL-shipped name ('qwen2_5': ChatML with <tool_call> "
            "tags, gives SmolLM2 tool calls) or a .jinja file, of the model's own chat format."
        },
    )
    # --- actor / learner
    sync_interval: int = field(
        default=1,
        metadata={
            "help": "Actor re-copies the learner's weights every N steps (1 = on-policy). On resume the actor "
            "re-copies the learner at the first step (checkpoints hold the learner only)."
        },
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer passes over each generation batch (TRL's num_iterations)."}
    )
    offload_reference: bool = field(
        default=False, metadata={"help": "Keep the reference model on CPU between its log-prob passes."}
    )
    # --- held-out evaluation
    eval_every: int = field(default=0, metadata={"help": "Greedy held-out eval every N steps (0: start and end only)."})
    eval_size: int = field(default=200, metadata={"help": "Held-out instances per task for eval."})
    eval_batch_size: int = field(default=256, metadata={"help": "Completions per decoding batch in eval."})
    eval_pass_k: int = field(
        default=0,
        metadata={
            "help": "k >= 2: also log eval_{task}_pass@k, the best of k completions sampled at `temperature` "
            "(pass@k for 0/1 graders) on the same held-out instances. 0: off."
        },
    )
    # --- data
    data_dir: str | None = field(default=None, metadata={"help": "Local dir with task data files (offline use)."})
    # --- run bookkeeping
    seed: int = field(default=0, metadata={"help": "Seed for model init, sampling and data order."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run; default: loss-tasks-seed-time."})
    out_dir: str = field(default="out", metadata={"help": "Where {run_name}.jsonl, config and checkpoints go."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: final model only)."})
    save_final_model: bool = field(default=True, metadata={"help": "save_pretrained the final model/adapter."})
    wandb_log: bool = field(default=False, metadata={"help": "Report to Weights & Biases."})
    wandb_project: str = field(default="nanopost_trl", metadata={"help": "W&B project."})
    mask_truncated_completions: bool = field(
        default=False,
        metadata={
            "help": "TRL's: completions cut at max_new_tokens leave the loss mask and the step's token count, for "
            "every loss (a loss's own mask_truncated drops them from its terms but not from num_items_in_batch)."
        },
    )
    refill_rounds: int = field(
        default=0,
        metadata={
            "help": "With a loss that drops prompt groups (keep_groups, e.g. DAPO's all-equal rewards): sample up to N "
            "more generation batches per step so the step still trains on prompts_per_step kept groups."
        },
    )
    completions_per_step_logged: int = field(
        default=4,
        metadata={
            "help": "Completions per step written to out/{run_name}-completions.jsonl (step, task, prompt, "
            "completion, reward, advantage), spread over the step's groups; 0: no file."
        },
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "TRL's log_completions: print a table of (prompt, completion, reward) and send it to W&B."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "log_completions: rows of TRL's table (None: the whole step)."}
    )
    collective_timeout_s: int = field(
        default=120,
        metadata={
            "help": "Multi-process runs: seconds a process waits in a collective, and for a silent peer, before it "
            "stops naming the lost rank (torch's own default is 10-30 minutes)."
        },
    )
    skip_nonfinite: bool = field(
        default=False, metadata={"help": "Skip (and count) steps whose loss is NaN/inf instead of raising."}
    )
    # --- memory / precision
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bfloat16 mixed precision: bf16 compute (autocast) over fp32 master weights. On a CPU without "
            "native bf16 (AVX512-BF16/AMX) the run falls back to fp32 and says so."
        },
    )
    bf16_weights: bool = field(
        default=False,
        metadata={
            "help": "Store the weights in bf16 too (no fp32 master copy; needs bf16): half the weight, gradient and "
            "AdamW memory, but updates below half a bf16 ulp round away (at lr 1e-5 most do: benchmarks/RESULTS.md)."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    chunked_logprobs: bool = field(
        default=True,
        metadata={
            "help": "Log-probs and entropies through TRL's fused LM head: tiles of <= 4096 positions x "
            "logprob_vocab_chunk vocabulary entries, recomputed in the backward, never the full logits. False: the "
            "model's own forward, materialising micro_batch x completion x vocab logits (the reference path)."
        },
    )
    shared_prompt: bool = field(
        default=True,
        metadata={
            "help": "Score the completions of one prompt with the prompt through the model once (one packed sequence, "
            "a custom attention mask; Prefix Grouper), in every log-prob pass: exact, and the learning phase's prompt "
            "compute shrinks by the group size. Falls back (and says why once) for models it cannot apply to."
        },
    )
    fast_sampling: bool = field(
        default=True,
        metadata={
            "help": "Sample without vLLM with each distinct prompt prefilled once per group (its KV cache laid out "
            "for the group's rows) and tool rounds continued from the cache: same sampling options and tokens as "
            "TRL's transformers path. False: TRL's path. Falls back (and says why once) where it cannot apply."
        },
    )
    logprob_vocab_chunk: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary entries per fused LM-head tile. Default: TRL's 32768 where its Triton kernel runs "
            f"(GPU), {CPU_VOCAB_CHUNK} on its torch fallback (CPU), whose backward holds tile-sized temporaries."
        },
    )
    use_liger_kernel: bool = field(
        default=False,
        metadata={"help": "TRL's: Liger's layer kernels (Triton, GPU only; the loss path is unchanged)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (GPU only; see vllm_mode)."})
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate': a vLLM engine inside each training process, sharing its GPU; 'server': one "
            "`trl vllm-serve` on GPUs of its own, at vllm_server_host:vllm_server_port (or vllm_server_base_url)."
        },
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vllm_mode='server': the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vllm_mode='server': the server's HTTP port."})
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "vllm_mode='server': the server's URL (e.g. http://10.0.0.2:8000), instead of host/port."},
    )
    vllm_group_port: int = field(
        default=51216,
        metadata={"help": "vllm_mode='server': the port of the weight-update group (trainer -> server NCCL)."},
    )
    vllm_server_timeout: float = field(
        default=240.0,
        metadata={"help": "vllm_mode='server': seconds TRL waits for the server's health check once its port answers."},
    )
    # --- LoRA (peft); lora_r = 0 trains all weights
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma list of modules or 'all-linear'."})
    merge_adapter_on_save: bool = field(default=False, metadata={"help": "Save the merged model instead of adapter."})
    # --- TRL's own options
    trl_args: TrlOptions = field(
        default_factory=TrlOptions,
        metadata={
            "help": "GRPOConfig options TRL applies as they are, by TRL's name (scale_rewards, top_k, warmup_ratio, "
            "...): TRL's flags and --config keys that are not ours land here. A JSON object on the command line."
        },
    )
    # --- hub
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model/adapter with a model card."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. user/my-run."})
    hub_private: bool = field(default=True, metadata={"help": "Create the hub repo as private."})

    def __post_init__(self) -> None:
        for name in ("num_steps", "prompts_per_step", "responses_per_prompt", "micro_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.responses_per_prompt < 2:
            raise ValueError("TrainConfig.responses_per_prompt must be >= 2: advantages are relative to the group")
        if self.sync_interval < 1:
            raise ValueError(f"TrainConfig.sync_interval must be >= 1, got {self.sync_interval}")
        if self.bf16_weights and not self.bf16:
            raise ValueError("TrainConfig.bf16_weights=True needs bf16=True (bf16 weights run bf16 compute)")
        if self.logprob_vocab_chunk is not None and self.logprob_vocab_chunk < 1:
            raise ValueError(f"TrainConfig.logprob_vocab_chunk must be >= 1 (or None), got {self.logprob_vocab_chunk}")
        if self.refill_rounds < 0:
            raise ValueError(f"TrainConfig.refill_rounds must be >= 0, got {self.refill_rounds}")
        if self.max_tool_calling_iterations < 0 or self.tool_timeout_s <= 0:
            raise ValueError(
                "TrainConfig.max_tool_calling_iterations must be >= 0 and tool_timeout_s > 0, got "
                f"{self.max_tool_calling_iterations} and {self.tool_timeout_s}"
            )
        if self.eval_pass_k == 1 or self.eval_pass_k < 0:
            raise ValueError(f"TrainConfig.eval_pass_k must be 0 (off) or >= 2, got {self.eval_pass_k}")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"TrainConfig.vllm_mode must be one of {', '.join(VLLM_MODES)}, got {self.vllm_mode!r}")
        self.trl_args = TrlOptions(self.trl_args)
        if refused := [f"{name} ({why})" for name in self.trl_args if (why := passthrough_refusal(name))]:
            raise ValueError(f"TrainConfig.trl_args: not passed to TRL as they are: {'; '.join(refused)}")
        if self.vllm_mode == "server" and not self.use_vllm:
            raise ValueError(
                "TrainConfig.vllm_mode='server' needs use_vllm=True (without it, generation runs in-process)"
            )
        if self.collective_timeout_s < 1:
            raise ValueError(f"TrainConfig.collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        if self.completions_per_step_logged < 0:
            raise ValueError(
                f"TrainConfig.completions_per_step_logged must be >= 0 (0: off), got {self.completions_per_step_logged}"
            )

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.responses_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def vocab_chunk(self, triton: bool) -> int:
        """Vocabulary entries per fused LM-head tile, with (`triton`) or without TRL's Triton kernel."""
        if self.logprob_vocab_chunk is not None:
            return self.logprob_vocab_chunk
        return TRL_VOCAB_CHUNK if triton else CPU_VOCAB_CHUNK


QWEN_0_5B, QWEN_1_5B, QWEN_3B = (f"Qwen/Qwen2.5-{size}-Instruct" for size in ("0.5B", "1.5B", "3B"))
GEMMA_1B = "google/gemma-3-1b-it"
# What the SmolLM2-135M presets on 2 CPU cores share: bf16 autocast, a constant lr, groups of 8, 4 to a micro-batch.
_SMOLLM_CPU_RUN = dict(
    model="smollm2-135m-instruct",
    responses_per_prompt=8,
    micro_batch_size=32,
    lr_schedule="constant",
    bf16=True,
)
# What every GPU preset shares, and the batch sizes per target GPU (unverified on a GPU: benchmarks/gpu_presets.py).
_GPU_RUN = dict(
    bf16=True,
    gradient_checkpointing=True,
    learning_rate=1e-6,
    temperature=1.0,
    eval_every=64,
    num_steps=1024,
    responses_per_prompt=8,
    max_new_tokens=512,
)
_A100_40GB = dict(_GPU_RUN, prompts_per_step=16, micro_batch_size=8)
_GPU_80GB = dict(_GPU_RUN, prompts_per_step=32, micro_batch_size=16)
_LORA_24GB = dict(_GPU_RUN, prompts_per_step=8, max_new_tokens=384, learning_rate=1e-5, lora_r=32, lora_alpha=64)


class DeviceTarget(NamedTuple):
    """The launch a GPU preset is sized for; the memory planner checks the preset against it."""

    processes: int
    gib: int  # memory per device
    zero_stage: int  # DeepSpeed ZeRO stage: 0 (none), 2, 3


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    """Everything known about one preset: its TrainConfig values, the hardware it is sized for (shown by `--list`),
    the task it trains on when none is named, and the device the planner checks it against (None: no GPU target)."""

    config: dict[str, Any]
    hardware: str
    task: str = "addition"
    target: DeviceTarget | None = None


class Preset(enum.Enum):
    """Rough (model, batch sizes, max_new_tokens) starting points; `Preset.X.make(**overrides) -> TrainConfig`."""

    # the learning rate and batch that learn here: benchmarks/RESULTS.md, "Embedded default"
    TINY_CPU = PresetSpec(
        dict(
            model=TINY_MODEL,
            num_steps=200,
            prompts_per_step=32,
            responses_per_prompt=8,
            micro_batch_size=128,
            max_new_tokens=4,
            learning_rate=1e-4,
            lr_schedule="constant",
            eval_every=20,
            eval_size=1000,
        ),
        hardware="2 CPU cores",
    )
    TINY_SMOKE = PresetSpec(
        dict(
            model=TINY_MODEL,
            num_steps=2,
            prompts_per_step=2,
            responses_per_prompt=4,
            micro_batch_size=8,
            max_new_tokens=8,
            learning_rate=1e-4,
            eval_size=16,
        ),
        hardware="CPU",
    )
    # a real instruct LLM on 2 CPU cores (the `smollm` extra): benchmarks/RESULTS.md, "A real instruct LLM on CPU"
    SMOLLM_CPU = PresetSpec(
        dict(
            _SMOLLM_CPU_RUN,
            num_steps=10,
            prompts_per_step=16,
            max_new_tokens=12,
            learning_rate=1e-5,
            eval_every=5,
            eval_size=200,
        ),
        hardware="2 CPU cores",
        task="arithmetic",
    )
    # SmolLM2 learns to call a calculator in 2 steps: benchmarks/RESULTS.md, "A real LLM learns to call a tool"
    SMOLLM_TOOLS_CPU = PresetSpec(
        dict(
            _SMOLLM_CPU_RUN,
            chat_template="qwen2_5",
            num_steps=6,
            prompts_per_step=4,
            max_new_tokens=96,
            max_tool_calling_iterations=1,
            temperature=0.7,
            learning_rate=3e-5,
            eval_every=2,
            eval_size=64,
        ),
        hardware="2 CPU cores",
        task="multiplication",
    )
    # SmolLM2 writes Python functions, run in the sandbox: benchmarks/RESULTS.md, "A real LLM on the code task"
    SMOLLM_CODE_CPU = PresetSpec(
        dict(
            _SMOLLM_CPU_RUN,
            num_steps=8,
            prompts_per_step=4,
            max_new_tokens=64,
            learning_rate=2e-5,
            eval_every=4,
            eval_size=60,
        ),
        hardware="2 CPU cores",
        task="code",
    )
    QWEN_0_5B_SMOKE = PresetSpec(
        dict(
            model=QWEN_0_5B,
            num_steps=2,
            prompts_per_step=2,
            responses_per_prompt=4,
            micro_batch_size=8,
            max_new_tokens=64,
            eval_size=8,
        ),
        hardware="CPU or any GPU",
    )
    QWEN_0_5B_FAST = PresetSpec(
        dict(_GPU_RUN, model=QWEN_0_5B, num_steps=256, prompts_per_step=16, micro_batch_size=32, max_new_tokens=256),
        hardware="any GPU",
        target=DeviceTarget(1, 24, 0),
    )
    QWEN_1_5B_1xA100 = PresetSpec(
        dict(_A100_40GB, model=QWEN_1_5B), hardware="1x A100 40GB", target=DeviceTarget(1, 40, 0)
    )
    QWEN_1_5B_1x80GB = PresetSpec(
        dict(_GPU_80GB, model=QWEN_1_5B), hardware="1x A100/H100 80GB", target=DeviceTarget(1, 80, 0)
    )
    GEMMA_1B_1xA100 = PresetSpec(
        dict(_A100_40GB, model=GEMMA_1B), hardware="1x A100 40GB", target=DeviceTarget(1, 40, 0)
    )
    GEMMA_1B_1x80GB = PresetSpec(
        dict(_GPU_80GB, model=GEMMA_1B), hardware="1x A100/H100 80GB", target=DeviceTarget(1, 80, 0)
    )
    # checked on the smaller A100 (a fit there is a fit on the 80 GB one); ZeRO-2: under plain DDP each process
    # would hold 3B fp32 weights + gradients + AdamW states
    QWEN_3B_8xA100 = PresetSpec(
        dict(_GPU_RUN, model=QWEN_3B, prompts_per_step=64, micro_batch_size=4),
        hardware="8x A100 40GB",
        target=DeviceTarget(8, 40, 2),
    )
    QWEN_1_5B_LORA_24GB = PresetSpec(
        dict(_LORA_24GB, model=QWEN_1_5B, micro_batch_size=8), hardware="1x 24GB GPU", target=DeviceTarget(1, 24, 0)
    )
    QWEN_3B_LORA_24GB = PresetSpec(
        dict(_LORA_24GB, model=QWEN_3B, micro_batch_size=4), hardware="1x 24GB GPU", target=DeviceTarget(1, 24, 0)
    )

    def make(self, **overrides: Any) -> TrainConfig:
        """A TrainConfig from this preset with `overrides` applied; unknown fields raise a TypeError. TRL's names
        (`num_generations=4`) set our fields, with a warning naming the field (`TRL_NAMES`)."""
        overrides, notes = translate_trl_names(overrides)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return make_dataclass(TrainConfig, {**self.value.config, **overrides})

    @classmethod
    def from_name(cls, name: str) -> Preset:
        by_name = {preset.name.lower(): preset for preset in cls}
        if name.lower() not in by_name:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(p.name for p in cls)}")
        return by_name[name.lower()]


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


def micro_batches(cfg: TrainConfig, num_processes: int) -> tuple[int, int]:
    """(completions per forward/backward, micro-batches accumulated per optimizer step) on each of `num_processes`;
    a ValueError when the step's completions do not split evenly."""
    if cfg.completions_per_step % num_processes:
        raise ValueError(
            f"prompts_per_step x responses_per_prompt = {cfg.completions_per_step} must divide evenly over "
            f"{num_processes} processes"
        )
    per_process = cfg.completions_per_step // num_processes
    micro_batch = min(cfg.micro_batch_size, per_process)
    if per_process % micro_batch:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} must divide the {per_process} completions each process "
            f"handles per step (prompts_per_step x responses_per_prompt over {num_processes} process(es))"
        )
    if cfg.refill_rounds and per_process % cfg.responses_per_prompt:
        raise ValueError(
            f"refill_rounds needs whole prompt groups on each process: responses_per_prompt="
            f"{cfg.responses_per_prompt} must divide the {per_process} completions each process handles per step"
        )
    return micro_batch, per_process // micro_batch


def run_to_resume(cfg: TrainConfig) -> str:
    """The run `--resume latest` continues: `cfg.run_name`, else the run in `out_dir` with the newest complete
    checkpoint. A ValueError when there is none to resume."""
    out = Path(cfg.out_dir)
    if cfg.run_name is not None:
        if latest_checkpoint(out / cfg.run_name) is None:
            raise ValueError(f"no checkpoint of run {cfg.run_name!r} to resume in {out / cfg.run_name}")
        return cfg.run_name
    checkpoints = [c for run in out.glob("*") if run.is_dir() and (c := latest_checkpoint(run)) is not None]
    if not checkpoints:
        raise ValueError(
            f"no run to resume in out_dir={str(out)!r}: no run directory there has a complete checkpoint "
            "(runs checkpoint with --save_every N)"
        )
    return max(checkpoints, key=lambda c: c.stat().st_mtime).parent.name


def output_paths(cfg: TrainConfig) -> dict[str, Path]:
    """Where a run writes: the per-step log, the sampled completions, the config record, the checkpoint directory."""
    out = Path(cfg.out_dir)
    return {
        "log": out / f"{cfg.run_name}.jsonl",
        "completions": out / f"{cfg.run_name}{COMPLETIONS_SUFFIX}",
        "config": out / f"{cfg.run_name}-config.json",
        "checkpoints": out / cfg.run_name,
    }


def to_grpo_config(cfg: TrainConfig, *, num_processes: int, reward_weights: list[float] | None = None):
    """The one place a TrainConfig becomes TRL's GRPOConfig.

    One optimizer step per generation batch: each process generates `completions_per_step / num_processes`
    completions and back-propagates them `micro_batch_size` at a time (gradient accumulation covers the rest).
    `beta` stays TRL's default: the loss owns its KL coefficient, and the adapter loads the reference model exactly
    when the loss reads it (`trl_bridge.with_reference`).
    With `wandb_log`, TRL reports to W&B; `Trainer.run` opens the run in `cfg.wandb_project` (no environment change).
    """
    from trl import GRPOConfig

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


def check_sharding(cfg: TrainConfig, *, zero_stage: int = 0, fsdp: bool = False) -> None:
    """Refuse the features that need what a sharded launch (DeepSpeed ZeRO `zero_stage`, or FSDP) does not give a
    process: a full actor copy of the weights (`sync_interval > 1`; ZeRO-3, FSDP), or a reference model it may
    move to the CPU (`offload_reference`; DeepSpeed and FSDP place it themselves)."""
    sharded = "FSDP" if fsdp else "ZeRO-3" if zero_stage == 3 else None
    if cfg.sync_interval > 1 and sharded:
        raise ValueError(f"sync_interval > 1 keeps a full actor copy of the weights: not supported with {sharded}")
    if cfg.offload_reference and zero_stage:
        raise ValueError("offload_reference: use DeepSpeed's own offload_param_device for the reference instead")
    if cfg.offload_reference and fsdp:
        raise ValueError(
            "offload_reference: not supported with FSDP, which shards the reference over the processes "
            "(fsdp_offload_params: true offloads every shard to CPU)"
        )
