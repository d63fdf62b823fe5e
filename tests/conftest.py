"""Shared fixtures: the embedded tokenizer, small random-init Qwen2 models, quiet single-thread torch."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from nanopost_trl.assets import TINY_MODEL_PATH

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and parallel test processes do not fight for cores


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_PATH, padding_side="left")


def random_qwen2(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Qwen2ForCausalLM:
    """A small random-init Qwen2 over the embedded tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tokenizer):
    """A saved random-init Qwen2 + the embedded tokenizer, loadable by path (TRL re-loads the reference from it)."""
    path = tmp_path_factory.mktemp("random_qwen2")
    random_qwen2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_trainer(tmp_path):
    """`tiny_trainer(trainer_class=NanopostGRPOTrainer, loss_fn=GRPOLoss(kl_coef=0.0), cfg_overrides=None,
    **grpo_options)`: a TINY_SMOKE trainer on the embedded model (2 prompts x 4 completions a step, rewarded by
    completion length), with TrainConfig fields and GRPOConfig options overridden."""
    from nanopost_trl.adapter import NanopostGRPOTrainer
    from nanopost_trl.config import Preset, to_grpo_config
    from nanopost_trl.losses import GRPOLoss
    from nanopost_trl.rewards import RewardAdapter
    from nanopost_trl.tasks import resolve_tasks
    from nanopost_trl.trainer import build_dataset

    def completion_length_reward(completions: list[str], instances: list) -> list[float]:
        return [float(len(completion)) for completion in completions]

    def make(
        trainer_class: type = NanopostGRPOTrainer, loss_fn=None, cfg_overrides: dict | None = None, **grpo_options
    ) -> NanopostGRPOTrainer:
        cfg = Preset.TINY_SMOKE.make(out_dir=str(tmp_path), run_name="tiny", num_steps=1, **(cfg_overrides or {}))
        args = to_grpo_config(cfg, num_processes=1)
        for name, value in grpo_options.items():
            setattr(args, name, value)
        instances = resolve_tasks("addition", "train")[:16]
        return trainer_class(
            model=AutoModelForCausalLM.from_pretrained(
                TINY_MODEL_PATH, dtype=torch.float32
            ),  # fp32 master weights, as a run
            reward_funcs=[
                RewardAdapter(lambda completions, instances: [float(len(c)) for c in completions], instances)
            ],
            args=args,
            train_dataset=build_dataset(instances),
            processing_class=AutoTokenizer.from_pretrained(TINY_MODEL_PATH, padding_side="left"),
            loss_fn=loss_fn or GRPOLoss(kl_coef=0.0),
            instances=instances,
            cfg=cfg,
        )

    return make
