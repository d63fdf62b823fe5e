"""TrainConfig (every knob of a run, documented) and Preset (rough starting points per model and GPU).

`Preset.QWEN_1_5B_1xA100.make(num_steps=2048, kl_coef=0.02)` returns a TrainConfig; `to_grpo_config` maps it onto
TRL's GRPOConfig. Field help strings double as the CLI's `--help`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import field
from pathlib import Path
from typing import Any

from nanopost_trl.models import TINY_MODEL
from nanopost_trl.utils import make_dataclass

# Vocabulary entries per tile of TRL's fused LM head: TRL's own width where its Triton kernel runs; on its torch
# fallback (CPU) the backward holds ~8 tile-sized fp32 temporaries, so a narrower tile (benchmarks/logprob_memory.py)
TRL_VOCAB_CHUNK, CPU_VOCAB_CHUNK = 32768, 4096


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
    logprob_vocab_chunk: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary entries per fused LM-head tile. Default: TRL's 32768 where its Triton kernel runs "
            f"(GPU), {CPU_VOCAB_CHUNK} on its torch fallback (CPU), whose backward holds ~8 tile-sized temporaries."
        },
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (colocate mode; GPU only)."})
    # --- LoRA (peft); lora_r = 0 trains all weights
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma list of modules or 'all-linear'."})
    merge_adapter_on_save: bool = field(default=False, metadata={"help": "Save the merged model instead of adapter."})
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
        if self.max_tool_calling_iterations < 0 or self.tool_timeout_s <= 0:
            raise ValueError(
                "TrainConfig.max_tool_calling_iterations must be >= 0 and tool_timeout_s > 0, got "
                f"{self.max_tool_calling_iterations} and {self.tool_timeout_s}"
            )
        if self.eval_pass_k == 1 or self.eval_pass_k < 0:
            raise ValueError(f"TrainConfig.eval_pass_k must be 0 (off) or >= 2, got {self.eval_pass_k}")

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


class Preset(enum.Enum):
    """Rough (model, batch sizes, max_new_tokens) starting points; `Preset.X.make(**overrides) -> TrainConfig`."""

    TINY_CPU = dict(  # measured in benchmarks/RESULTS.md: lr >= 2e-4 collapses, 8 prompts per step does not learn
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
    )
    TINY_SMOKE = dict(
        model=TINY_MODEL,
        num_steps=2,
        prompts_per_step=2,
        responses_per_prompt=4,
        micro_batch_size=8,
        max_new_tokens=8,
        learning_rate=1e-4,
        eval_size=16,
    )
    SMOLLM_CPU = dict(  # a real instruct LLM on 2 CPU cores (the `smollm` extra); measured in benchmarks/RESULTS.md
        model="smollm2-135m-instruct",
        num_steps=10,
        prompts_per_step=16,
        responses_per_prompt=8,
        micro_batch_size=32,
        max_new_tokens=12,
        learning_rate=1e-5,
        lr_schedule="constant",
        bf16=True,
        eval_every=5,
        eval_size=200,
    )
    QWEN_0_5B_SMOKE = dict(
        model=QWEN_0_5B,
        num_steps=2,
        prompts_per_step=2,
        responses_per_prompt=4,
        micro_batch_size=8,
        max_new_tokens=64,
        eval_size=8,
    )
    QWEN_0_5B_FAST = dict(
        _GPU_RUN, model=QWEN_0_5B, num_steps=256, prompts_per_step=16, micro_batch_size=32, max_new_tokens=256
    )
    QWEN_1_5B_1xA100 = dict(_A100_40GB, model=QWEN_1_5B)
    QWEN_1_5B_1x80GB = dict(_GPU_80GB, model=QWEN_1_5B)
    GEMMA_1B_1xA100 = dict(_A100_40GB, model=GEMMA_1B)
    GEMMA_1B_1x80GB = dict(_GPU_80GB, model=GEMMA_1B)
    QWEN_3B_8xA100 = dict(_GPU_RUN, model=QWEN_3B, prompts_per_step=64, micro_batch_size=4)
    QWEN_1_5B_LORA_24GB = dict(_LORA_24GB, model=QWEN_1_5B, micro_batch_size=8)
    QWEN_3B_LORA_24GB = dict(_LORA_24GB, model=QWEN_3B, micro_batch_size=4)

    def make(self, **overrides: Any) -> TrainConfig:
        """A TrainConfig from this preset with `overrides` applied; unknown fields raise a TypeError."""
        return make_dataclass(TrainConfig, {**self.value, **overrides})

    @classmethod
    def from_name(cls, name: str) -> Preset:
        by_name = {preset.name.lower(): preset for preset in cls}
        if name.lower() not in by_name:
            raise ValueError(f"unknown preset {name!r}; valid: {', '.join(p.name for p in cls)}")
        return by_name[name.lower()]


# What each preset is sized for (shown by `nanopost-trl --list` and `--help`).
PRESET_HARDWARE = {
    "TINY_CPU": "2 CPU cores",
    "TINY_SMOKE": "CPU",
    "SMOLLM_CPU": "2 CPU cores",
    "QWEN_0_5B_SMOKE": "CPU or any GPU",
    "QWEN_0_5B_FAST": "any GPU",
    "QWEN_1_5B_1xA100": "1x A100 40GB",
    "QWEN_1_5B_1x80GB": "1x A100/H100 80GB",
    "GEMMA_1B_1xA100": "1x A100 40GB",
    "GEMMA_1B_1x80GB": "1x A100/H100 80GB",
    "QWEN_3B_8xA100": "8x A100 40GB",
    "QWEN_1_5B_LORA_24GB": "1x 24GB GPU",
    "QWEN_3B_LORA_24GB": "1x 24GB GPU",
}


# The task a preset trains on when the command line names none (else "addition", the embedded model's).
PRESET_TASKS = {"SMOLLM_CPU": "arithmetic"}


def output_paths(cfg: TrainConfig) -> dict[str, Path]:
    """Where a run writes: the per-step log, the config record, and the checkpoint directory."""
    out = Path(cfg.out_dir)
    return {
        "log": out / f"{cfg.run_name}.jsonl",
        "config": out / f"{cfg.run_name}-config.json",
        "checkpoints": out / cfg.run_name,
    }


def to_grpo_config(
    cfg: TrainConfig, *, num_processes: int, uses_reference: bool, reward_weights: list[float] | None = None
):
    """The one place a TrainConfig becomes TRL's GRPOConfig.

    One optimizer step per generation batch: each process generates `completions_per_step / num_processes`
    completions and back-propagates them `micro_batch_size` at a time (gradient accumulation covers the rest).
    TRL's `beta` only gates the reference model here (the loss owns its KL coefficient), so it is 1.0 when the loss
    reads reference log-probs and 0.0 (no reference model, no reference forward pass) otherwise.
    With `wandb_log`, TRL reports to W&B; `Trainer.run` opens the run in `cfg.wandb_project` (no environment change).
    """
    import torch
    from trl import GRPOConfig

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
            f"handles per step"
        )
    return GRPOConfig(
        output_dir=str(output_paths(cfg)["checkpoints"]),
        run_name=cfg.run_name,
        max_steps=cfg.num_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=per_process // micro_batch,
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
        beta=1.0 if uses_reference else 0.0,
        num_iterations=cfg.num_iterations,
        max_tool_calling_iterations=cfg.max_tool_calling_iterations,
        reward_weights=reward_weights,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        report_to=["wandb"] if cfg.wandb_log else "none",
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        use_vllm=cfg.use_vllm,
        vllm_mode="colocate",
        push_to_hub=False,  # `Trainer.run` pushes the final model/adapter with its card (nanopost_trl.hub), once
        hub_model_id=cfg.hub_model_id,
        log_completions=False,
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun/`accelerate launch --multi_gpu` use gloo on CPU
        dataloader_pin_memory=torch.cuda.is_available(),
        # every trainable weight is in each step's graph (a gated loss's skipped rows still run the forward, and a
        # process that keeps no row runs one with zero weight): no extra autograd traversal per step under DDP
        ddp_find_unused_parameters=False,
    )
