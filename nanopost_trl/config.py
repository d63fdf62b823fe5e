"""TrainConfig: every setting of a run, documented; its field help strings double as the CLI's `--help`.

Beside it, each in a module of its own: the presets (`nanopost_trl.presets`), TRL's names and TrainConfig as TRL's
GRPOConfig (`nanopost_trl.trl_config`), a run's file paths and what `--resume latest` continues
(`nanopost_trl.run_paths`), and the launch checks (`nanopost_trl.launch`). Their names stay importable from here
(`from nanopost_trl.config import Preset`), as before they moved.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from nanopost_trl.assets import TINY_MODEL

# Vocabulary entries per tile of TRL's fused LM head: TRL's own width where its Triton kernel runs; on its torch
# fallback (CPU) the backward holds several tile-sized fp32 temporaries, so a narrower tile
# (benchmarks/RESULTS.md, "Chunked log-probs on a 152k vocabulary")
TRL_VOCAB_CHUNK, CPU_VOCAB_CHUNK = 32768, 4096
VLLM_MODES = ("colocate", "server")


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
    # --- the learner's batch: which completions and groups the loss trains on, and a loss that is not finite
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
    skip_nonfinite: bool = field(
        default=False, metadata={"help": "Skip (and count) steps whose loss is NaN/inf instead of raising."}
    )
    # --- sampling
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum completion length in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling for rollouts."})
    fast_sampling: bool = field(
        default=True,
        metadata={
            "help": "Sample without vLLM with each distinct prompt prefilled once per group (its KV cache laid out "
            "for the group's rows) and tool rounds continued from the cache: same sampling options and tokens as "
            "TRL's transformers path. False: TRL's path. Falls back (and says why once) where it cannot apply."
        },
    )
    # --- sampling with vLLM (GPU only)
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
    # --- run name, logs and checkpoints
    seed: int = field(default=0, metadata={"help": "Seed for model init, sampling and data order."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run; default: loss-tasks-seed-time."})
    out_dir: str = field(default="out", metadata={"help": "Where {run_name}.jsonl, config and checkpoints go."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: final model only)."})
    save_final_model: bool = field(default=True, metadata={"help": "save_pretrained the final model/adapter."})
    collective_timeout_s: int = field(
        default=120,
        metadata={
            "help": "Multi-process runs: seconds a process waits in a collective, and for a silent peer, before it "
            "stops naming the lost rank (torch's own default is 10-30 minutes)."
        },
    )
    wandb_log: bool = field(default=False, metadata={"help": "Report to Weights & Biases."})
    wandb_project: str = field(default="nanopost_trl", metadata={"help": "W&B project."})
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
    # --- memory / precision / the learner's speed
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
        self.trl_args = TrlOptions(self.trl_args)  # checked against GRPOConfig by `trl_config.to_grpo_config`
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


# names that moved to a module of their own -> that module (`from nanopost_trl.config import Preset` still works)
MOVED = {
    **dict.fromkeys(
        ("Preset", "PresetSpec", "DeviceTarget", "QWEN_0_5B", "QWEN_1_5B", "QWEN_3B", "GEMMA_1B"), "presets"
    ),
    **dict.fromkeys(
        ("TrlName", "TRL_NAMES", "trl_meaning", "passthrough_refusal", "translate_trl_names", "grpo_disagreements",
         "to_grpo_config", "grpo_settings"),
        "trl_config",
    ),
    **dict.fromkeys(("COMPLETIONS_SUFFIX", "output_paths", "run_to_resume"), "run_paths"),
    **dict.fromkeys(("micro_batches", "check_sharding"), "launch"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return getattr(importlib.import_module(f"nanopost_trl.{MOVED[name]}"), name)
    raise AttributeError(f"module 'nanopost_trl.config' has no attribute {name!r}")
