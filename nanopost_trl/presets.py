"""Presets: rough starting points per model and target hardware, each one record (`PresetSpec`) of TrainConfig values,
the hardware it is sized for, the task it trains on when none is named, and the device the planner checks it against.

`Preset.QWEN_1_5B_1xA100.make(num_steps=2048, kl_coef=0.02)` returns a TrainConfig; TRL's names work there too.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Any, NamedTuple

from nanopost_trl.assets import TINY_MODEL
from nanopost_trl.config import TrainConfig
from nanopost_trl.trl_config import translate_trl_names
from nanopost_trl.utils import make_dataclass

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
