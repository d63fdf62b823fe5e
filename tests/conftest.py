"""Shared fixtures: the embedded tokenizer, small random-init Qwen2 models, quiet single-thread torch."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

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
