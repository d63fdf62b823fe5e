"""Held-out evaluation: batched greedy (or best-of-k sampled) decoding through the chat template, scored by eval_fn."""

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
def held_out_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: list[TaskInstance],
    max_new_tokens: int,
    batch_size: int = 256,
    samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Mean eval_fn score per task name: of the greedy completion (`samples=1`), or of the best of `samples` completions
    sampled at `temperature` (pass@k for 0/1 graders), drawn from a private RNG seeded by `seed` so that training's
    RNG stream is untouched. A grader that raises or hangs scores 0. model.training is restored."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = model.generation_config.eos_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples)
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id if eos_id is not None else tokenizer.eos_token_id,
        **(sampling if samples > 1 else dict(do_sample=False)),
    )
    device = next(model.parameters()).device
    prompts_per_call = max(batch_size // samples, 1)
    scores: dict[str, list[float]] = defaultdict(list)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(instances), prompts_per_call):
                batch = instances[start : start + prompts_per_call]
                completions = _generate(model, tokenizer, [i.prompt for i in batch], generation_config, pad_id)
                starts = range(0, len(completions), samples)  # generate returns each prompt's `samples` rows together
                for instance, start in zip(batch, starts, strict=True):
                    graded = [safe_grade(instance.eval_fn, c) for c in completions[start : start + samples]]
                    scores[instance.name].append(max(0.0 if math.isnan(score) else score for score in graded))
    finally:
        model.train(was_training)
    return {name: sum(values) / len(values) for name, values in scores.items()}


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    generation_config: GenerationConfig,
    pad_id: int,
) -> list[str]:
    """Decoded completions of left-padded `prompts`, `num_return_sequences` consecutive rows per prompt."""
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    width = max(len(row) for row in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
