"""Held-out evaluation: batched greedy decoding through the tokenizer's chat template, scored by each eval_fn."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from nanopost_trl.base import Prompt, TaskInstance
from nanopost_trl.rewards import safe_grade


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt), text as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: list[TaskInstance],
    max_new_tokens: int,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean eval_fn score of greedy completions, per task name. Prompts are left-padded; model.training is restored."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = model.generation_config.eos_token_id
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id if eos_id is not None else tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    scores: dict[str, list[float]] = defaultdict(list)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(instances), batch_size):
            batch = instances[start : start + batch_size]
            ids = [prompt_ids(tokenizer, instance.prompt) for instance in batch]
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
            attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
            )
            completions = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for instance, completion in zip(batch, completions, strict=True):
                score = safe_grade(instance.eval_fn, completion)  # a grader that raises or hangs scores 0
                scores[instance.name].append(0.0 if math.isnan(score) else score)
    finally:
        model.train(was_training)
    return {name: sum(values) / len(values) for name, values in scores.items()}
