"""Held-out evaluation: batched greedy (or best-of-k sampled) decoding through the chat template, scored by eval_fn.

A tool task's instances run multi-turn episodes as TRL's tool loop does in training: the model's tool calls parsed by
TRL's `parse_response`, executed (guarded, as in training), their results rendered by the chat template and appended
token by token, up to `max_tool_calling_iterations` rounds within `max_new_tokens` completion tokens (tool results
included); eval_fn grades the final assistant message, and `held_out_scores` also gives each tool task's tool-call
rate (the share of episodes with at least one call the parser read).
"""

from __future__ import annotations

import collections
import copy
import math
from collections import defaultdict
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from nanopost_trl import chat_templates, tools
from nanopost_trl.base import Prompt, TaskInstance
from nanopost_trl.rewards import safe_grade
from nanopost_trl.utils import text_of


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt), text as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def held_out_accuracy(*args: Any, **kwargs: Any) -> dict[str, float]:
    """Mean eval_fn score per task name: `held_out_scores(...)["accuracy"]`."""
    return held_out_scores(*args, **kwargs)["accuracy"]


@torch.no_grad()
def held_out_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: list[TaskInstance],
    max_new_tokens: int,
    batch_size: int = 256,
    samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_tool_calling_iterations: int = 4,
    tool_timeout_s: float = tools.DEFAULT_TOOL_TIMEOUT_S,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Per task name, under "accuracy": the mean eval_fn score of the greedy completion (`samples=1`), or of the best
    of `samples` completions sampled at `temperature` (pass@k for 0/1 graders), drawn from a private RNG seeded by
    `seed` so that training's RNG stream is untouched. A grader that raises or hangs scores 0. model.training is
    restored. Tool tasks: episodes (module docstring), and under "tool_calls" the share of episodes that made a call.
    `progress`: a progress bar over the instances on a terminal (the run's main process shows one for its shard)."""
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
    tool_calls: dict[str, list[bool]] = defaultdict(list)
    was_training = model.training
    model.eval()
    by_tools = sorted(instances, key=lambda instance: instance.uses_tools)  # tool tasks batched apart
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            on_terminal = None if progress else True  # tqdm's disable=None: shown on a terminal only, not in log files
            bar = tqdm(total=len(by_tools), desc="held-out eval", unit="prompt", leave=False, disable=on_terminal)
            for start in range(0, len(by_tools), prompts_per_call):
                batch = by_tools[start : start + prompts_per_call]
                if any(instance.uses_tools for instance in batch):
                    episodes = tool_episodes(
                        model, tokenizer, batch, generation_config, pad_id, samples, max_tool_calling_iterations,
                        tool_timeout_s,
                    )  # fmt: skip
                    completions = [text_of(episode.replies, role="assistant") for episode in episodes]
                    for episode, instance in zip(episodes, (i for i in batch for _ in range(samples)), strict=True):
                        tool_calls[instance.name].append(episode.called_a_tool)
                else:
                    completions = _generate(model, tokenizer, [i.prompt for i in batch], generation_config, pad_id)
                starts = range(0, len(completions), samples)  # generate returns each prompt's `samples` rows together
                for instance, start in zip(batch, starts, strict=True):
                    graded = [safe_grade(instance.eval_fn, c) for c in completions[start : start + samples]]
                    scores[instance.name].append(max(0.0 if math.isnan(score) else score for score in graded))
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)
    return {metric: {name: sum(values) / len(values) for name, values in by_task.items()}
            for metric, by_task in (("accuracy", scores), ("tool_calls", tool_calls))}  # fmt: skip


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    generation_config: GenerationConfig,
    pad_id: int,
) -> list[str]:
    """Decoded completions of left-padded `prompts`, `num_return_sequences` consecutive rows per prompt."""
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    return tokenizer.batch_decode(_generate_ids(model, ids, generation_config, pad_id), skip_special_tokens=True)


def _generate_ids(
    model: PreTrainedModel, ids: list[list[int]], generation_config: GenerationConfig, pad_id: int
) -> torch.Tensor:
    """The new tokens after left-padded prompt `ids` (rows padded with `pad_id` after an end-of-sequence)."""
    width = max(len(row) for row in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    return output[:, width:]


class Episode:
    """One multi-turn episode of the held-out evaluation: its messages, token ids and (guarded) tools."""

    def __init__(
        self, instance: TaskInstance, tokenizer: PreTrainedTokenizerBase, counts: collections.Counter, timeout_s: float
    ) -> None:
        self.messages: list[dict[str, Any]] = copy.deepcopy(list(instance.prompt))
        self.tools = [tools.guarded(tool, counts, timeout_s) for tool in instance.tools]
        if instance.environment_factory is not None:
            environment = tools.guarded_environments(instance.environment_factory, counts, timeout_s)()
            observation = environment.reset(prompt=instance.prompt)
            if isinstance(observation, str):  # appended to the last prompt message, as TRL does
                self.messages[-1] = {**self.messages[-1], "content": self.messages[-1]["content"] + observation}
            self.tools += tools.environment_tools(environment)
        self.ids: list[int] = tokenizer.apply_chat_template(
            self.messages, tools=self.tools or None, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        self.prompt_length = len(self.ids)
        self.replies: list[dict[str, Any]] = []  # the episode after the prompt: assistant and tool messages

    @property
    def called_a_tool(self) -> bool:
        """Whether an assistant turn holds a tool call that the parser read (well-formed)."""
        return any(reply.get("tool_calls") for reply in self.replies if reply["role"] == "assistant")

    def run_tool_calls(self, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tool messages of `tool_calls`; an unknown tool or a failed call gives `{'error': ...}`, as in TRL."""
        by_name = {tool.__name__: tool for tool in self.tools}
        messages = []
        for call in tool_calls:
            function = call.get("function", {})
            name = function.get("name", "unknown")
            try:
                if call.get("type") != "function" or name not in by_name:
                    raise ValueError(f"Tool {name} not found.")
                result: Any = by_name[name](**function["arguments"])
            except Exception as error:
                result = {"error": str(error)}
            messages.append({"role": "tool", "name": name, "content": str(result)})
        return messages


def tool_suffix_ids(tokenizer: PreTrainedTokenizerBase, tool_messages: list[dict[str, Any]]) -> list[int]:
    """The tokens that follow an assistant turn's end-of-sequence to render `tool_messages` and open the next assistant
    turn, from a minimal conversation, as TRL's tool loop builds them."""
    call = {"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    prefix = tokenizer.apply_chat_template(dummy, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        dummy + tool_messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ends = [i for i, token in enumerate(prefix) if token == tokenizer.eos_token_id]
    prefix = prefix[: ends[-1] + 1] if ends else prefix
    return full[len(prefix) :]


def tool_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: list[TaskInstance],
    generation_config: GenerationConfig,
    pad_id: int,
    samples: int,
    max_tool_calling_iterations: int,
    timeout_s: float,
) -> list[Episode]:
    """The multi-turn episodes of `instances`, `samples` consecutive ones per instance (module docstring)."""
    from trl.chat_template_utils import parse_response

    chat_templates.check_tool_template(tokenizer, model.name_or_path)  # and the tool-call parser, as training sets it
    budget = generation_config.max_new_tokens
    one_each = GenerationConfig(**{**generation_config.to_dict(), "num_return_sequences": 1})
    counts: collections.Counter[str] = collections.Counter()  # eval's tool failures are not training's
    episodes = [Episode(instance, tokenizer, counts, timeout_s) for instance in instances for _ in range(samples)]
    eos = set(
        generation_config.eos_token_id
        if isinstance(generation_config.eos_token_id, list)
        else [generation_config.eos_token_id]
    )
    active = list(episodes)
    for round_ in range(max_tool_calling_iterations + 1):
        if not active:
            break
        one_each.max_new_tokens = max(budget - (len(e.ids) - e.prompt_length) for e in active)
        new_rows = _generate_ids(model, [e.ids for e in active], one_each, pad_id).tolist()
        still_active = []
        for episode, row in zip(active, new_rows, strict=True):
            row = row[: budget - (len(episode.ids) - episode.prompt_length)]
            end = next((i for i, token in enumerate(row) if token in eos), None)
            row = row if end is None else row[: end + 1]
            reply = parse_response(tokenizer, row, prefix=episode.ids, tools=episode.tools)
            episode.replies.append(reply)
            episode.ids = episode.ids + row
            if not reply.get("tool_calls") or round_ == max_tool_calling_iterations:
                continue
            results = episode.run_tool_calls(reply["tool_calls"])
            suffix = tool_suffix_ids(tokenizer, results)
            if len(episode.ids) + len(suffix) - episode.prompt_length > budget:
                continue  # no room for the results: the episode ends here, as in TRL's loop
            episode.replies += results
            episode.ids = episode.ids + suffix
            still_active.append(episode)
        active = still_active
    return episodes
