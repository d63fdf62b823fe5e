"""Held-out evaluation: batched greedy (or best-of-k sampled) decoding through the chat template, scored by eval_fn
(`held_out_scores`), and a run's eval over all processes of its launch, each scoring its shard (`held_out_eval`).

A tool task's instances run multi-turn episodes built as TRL's training tool loop (GRPOTrainer's private
`_tool_call_loop` and `_get_tool_suffix_ids`) builds them, so that the eval scores the episodes training runs; it has
its own copy because it runs without a trainer (benchmarks/tool_baseline.py) and greedy. As in TRL: the prompt and the
tool results rendered with the template TRL's loop uses (`chat_templates.tool_loop_template`: the tokenizer's own, or
TRL's training version where that one is not prefix-preserving) and GRPOConfig's `chat_template_kwargs`; an
environment's `reset` observation appended to the last prompt message; the model's tool calls parsed by TRL's
`parse_response` and executed (guarded, as in training; async tools awaited together, their results after the
others'; an unknown tool, a failed call or a call that is not a function gives `{'error': ...}`); a result kept as is
if it is a list of content blocks, else `str`-ed; its tokens appended after the assistant turn's EOS (`tool_suffix_ids`,
which raises where TRL's prefix check does); a round whose results would pass `max_new_tokens` completion tokens or the
model's `max_position_embeddings` dropped, ending the episode; up to `max_tool_calling_iterations` rounds. eval_fn
grades the final assistant message; `held_out_scores` also gives each tool task's tool-call rate (the share of
episodes with at least one call the parser read).

Pinned by tests/test_eval_tool_loop.py against TRL itself, on real components: the suffix ids equal GRPOTrainer's own
on every chat template TRL ships that renders tool calls (SmolLM2's tokenizer; the same errors where TRL raises), the
tool messages of one turn's calls equal those TRL's `_tool_call_loop` appends, and SmolLM2-135M-Instruct's greedy
episodes on the multiplication task (messages, prompt and completion ids) equal TRL's training loop's (slow).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import functools
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from nanopost_trl import chat_templates, tools
from nanopost_trl.base import Prompt, TaskInstance
from nanopost_trl.rewards import safe_grade
from nanopost_trl.utils import text_of


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat_template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation prompt and
    `chat_template_kwargs`), text as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return ChatRendering(kwargs=chat_template_kwargs or {}).ids(tokenizer, prompt, add_generation_prompt=True)


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that left-pads prompts: the tokenizer's padding token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eval_generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, samples: int, temperature: float
) -> GenerationConfig:
    """The eval's decoding: greedy (`samples=1`), else `samples` completions a prompt sampled at `temperature`."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=padding_id(tokenizer),
        eos_token_id=stop_token_ids(model, tokenizer),
        **(sampling if samples > 1 else dict(do_sample=False)),
    )


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion, as GRPOTrainer takes them: the tokenizer's EOS and the model's."""
    model_ids = model.generation_config.eos_token_id
    ids = [] if model_ids is None else [model_ids] if isinstance(model_ids, int) else list(model_ids)
    return ids if tokenizer.eos_token_id in ids else [tokenizer.eos_token_id, *ids]


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
    chat_template_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Per task name, under "accuracy": the mean eval_fn score of the greedy completion (`samples=1`), or of the best
    of `samples` completions sampled at `temperature` (pass@k for 0/1 graders), drawn from a private RNG seeded by
    `seed` so that training's RNG stream is untouched. A grader that raises or hangs scores 0. model.training is
    restored. Tool tasks: episodes (module docstring), and under "tool_calls" the share of episodes that made a call.
    `progress`: a progress bar over the instances on a terminal (the run's main process shows one for its shard).
    `chat_template_kwargs`: GRPOConfig's, passed to the chat template as in training."""
    pad_id = padding_id(tokenizer)
    generation_config = eval_generation_config(model, tokenizer, max_new_tokens, samples, temperature)
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
                        tool_timeout_s, chat_template_kwargs,
                    )  # fmt: skip
                    completions = [text_of(episode.replies, role="assistant") for episode in episodes]
                    for episode, instance in zip(episodes, (i for i in batch for _ in range(samples)), strict=True):
                        tool_calls[instance.name].append(episode.called_a_tool)
                else:
                    prompts = [instance.prompt for instance in batch]
                    completions = _generate(model, tokenizer, prompts, generation_config, pad_id, chat_template_kwargs)
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
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Decoded completions of left-padded `prompts`, `num_return_sequences` consecutive rows per prompt."""
    ids = [prompt_ids(tokenizer, prompt, chat_template_kwargs) for prompt in prompts]
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


@dataclasses.dataclass(frozen=True)
class ChatRendering:
    """How training renders chats: the chat template (None: the tokenizer's own) and GRPOConfig.chat_template_kwargs."""

    template: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def ids(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, Any]],
        tools: list[Callable] | None = None,
        add_generation_prompt: bool = False,
    ) -> list[int]:
        """The token ids of `messages` (with `tools`' schemas, and the generation prompt if asked)."""
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, add_generation_prompt=add_generation_prompt,
            tokenize=True, return_dict=True, **self.kwargs,
        )["input_ids"]  # fmt: skip


class Episode:
    """One multi-turn episode of the held-out evaluation: its messages, token ids and (guarded) tools."""

    def __init__(
        self,
        instance: TaskInstance,
        tokenizer: PreTrainedTokenizerBase,
        rendering: ChatRendering,
        counts: collections.Counter,
        timeout_s: float,
    ) -> None:
        self.messages: list[dict[str, Any]] = copy.deepcopy(list(instance.prompt))
        self.tools = [tools.guarded(tool, counts, timeout_s) for tool in instance.tools]
        if instance.environment_factory is not None:
            environment = tools.guarded_environments(instance.environment_factory, counts, timeout_s)()
            self.messages = with_observation(self.messages, environment.reset(prompt=instance.prompt))
            self.tools += tools.environment_tools(environment)
        self.ids: list[int] = rendering.ids(tokenizer, self.messages, self.tools or None, add_generation_prompt=True)
        self.prompt_length = len(self.ids)
        self.replies: list[dict[str, Any]] = []  # the episode after the prompt: assistant and tool messages

    @property
    def called_a_tool(self) -> bool:
        """Whether an assistant turn holds a tool call that the parser read (well-formed)."""
        return any(reply.get("tool_calls") for reply in self.replies if reply["role"] == "assistant")

    def run_tool_calls(self, tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tool messages of `tool_calls`, as TRL's loop makes them: an unknown tool, a failed call or a call that is
        not a function gives `{'error': ...}`; async tools run together, their results after the others'; a result
        is kept as is if it is a list (content blocks), else rendered by `str`."""
        sync_tools = {tool.__name__: tool for tool in self.tools if not inspect.iscoroutinefunction(tool)}
        async_tools = {tool.__name__: tool for tool in self.tools if inspect.iscoroutinefunction(tool)}
        results: list[tuple[str, Any]] = []
        awaiting: list[tuple[str, Coroutine]] = []
        for call in tool_calls:
            if call.get("type") != "function":
                error = f"Unsupported tool call type: {call.get('type')}"
                results.append((call.get("name", "unknown"), {"error": error}))
                continue
            name = call["function"]["name"]
            try:
                if name in sync_tools:
                    results.append((name, sync_tools[name](**call["function"]["arguments"])))
                elif name in async_tools:
                    awaiting.append((name, async_tools[name](**call["function"]["arguments"])))
                else:
                    raise ValueError(f"Tool {name} not found.")
            except Exception as error:
                results.append((name, {"error": str(error)}))
        if awaiting:
            outcomes = asyncio.run(_gather([coroutine for _, coroutine in awaiting]))
            for (name, _), outcome in zip(awaiting, outcomes, strict=True):
                results.append((name, {"error": str(outcome)} if isinstance(outcome, Exception) else outcome))
        return [
            {"role": "tool", "name": name, "content": result if isinstance(result, list) else str(result)}
            for name, result in results
        ]


async def _gather(coroutines: list[Coroutine]) -> list[Any]:
    """The coroutines' results (or exceptions), run together."""
    return await asyncio.gather(*coroutines, return_exceptions=True)


def with_observation(prompt: list[dict[str, Any]], observation: str | list | None) -> list[dict[str, Any]]:
    """`prompt` with an environment's `reset` observation appended to its last message's content, as TRL does (a str
    observation to list content as a text block, a list observation to str content after it as one); None: unchanged."""
    if observation is None:
        return prompt
    content = prompt[-1]["content"]
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return [*prompt[:-1], {**prompt[-1], "content": content + observation}]


def tool_suffix_ids(
    tokenizer: PreTrainedTokenizerBase,
    tool_messages: list[dict[str, Any]],
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The tokens that follow an assistant turn's end-of-sequence to render `tool_messages` and open the next assistant
    turn, as TRL's tool loop builds them: a minimal conversation (a user message, an assistant call of the first
    result's tool) rendered without and with them, the first cut after its last EOS. A template that renders that
    cut otherwise once the results follow (not prefix-preserving) raises ValueError, as in TRL."""
    rendering = ChatRendering(chat_template, chat_template_kwargs or {})
    call = {"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}
    conversation = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    before = rendering.ids(tokenizer, conversation)
    after = rendering.ids(tokenizer, conversation + tool_messages, add_generation_prompt=True)
    ends = [i for i, token in enumerate(before) if token == tokenizer.eos_token_id]
    turn = before[: ends[-1] + 1] if ends else before
    if after[: len(turn)] != turn:
        raise ValueError(
            "the chat template renders an assistant turn differently once tool results follow it (not prefix-"
            "preserving up to its EOS), so the tool results' tokens cannot be appended: TRL's tool loop stops here too"
        )
    return after[len(turn) :]


def tool_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instances: list[TaskInstance],
    generation_config: GenerationConfig,
    pad_id: int,
    samples: int,
    max_tool_calling_iterations: int,
    timeout_s: float,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[Episode]:
    """The multi-turn episodes of `instances`, `samples` consecutive ones per instance (module docstring)."""
    from trl.chat_template_utils import parse_response

    chat_templates.check_tool_template(tokenizer, model.name_or_path)  # and the tool-call parser, as training sets it
    rendering = ChatRendering(chat_templates.tool_loop_template(tokenizer), chat_template_kwargs or {})
    budget = generation_config.max_new_tokens
    context = model.config.get_text_config().max_position_embeddings
    one_each = GenerationConfig(**{**generation_config.to_dict(), "num_return_sequences": 1})
    counts: collections.Counter[str] = collections.Counter()  # eval's tool failures are not training's
    episodes = [
        Episode(instance, tokenizer, rendering, counts, timeout_s) for instance in instances for _ in range(samples)
    ]
    eos = generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    active = list(episodes)
    for round_ in range(max_tool_calling_iterations + 1):
        if not active:
            break
        one_each.max_new_tokens = max(budget - (len(e.ids) - e.prompt_length) for e in active)
        new_rows = _generate_ids(model, [e.ids for e in active], one_each, pad_id).tolist()
        still_active = []
        for episode, row in zip(active, new_rows, strict=True):
            row = row[: budget - (len(episode.ids) - episode.prompt_length)]
            end = next((i for i, token in enumerate(row) if token in stop_ids), None)
            row = row if end is None else row[: end + 1]
            if not row:
                continue  # the tool results filled the budget: no reply, as in TRL's loop
            reply = parse_response(tokenizer, row, prefix=episode.ids, tools=episode.tools)
            episode.replies.append(reply)
            episode.ids = episode.ids + row
            if not reply.get("tool_calls") or round_ == max_tool_calling_iterations:
                continue
            results = episode.run_tool_calls(reply["tool_calls"])
            suffix = tool_suffix_ids(tokenizer, results, rendering.template, rendering.kwargs)
            length = len(episode.ids) + len(suffix)
            if length - episode.prompt_length > budget or length >= context:
                continue  # no room for the results (completion budget, model context): it ends here, as in TRL
            episode.replies += results
            episode.ids = episode.ids + suffix
            still_active.append(episode)
        active = still_active
    return episodes


def held_out_eval(trainer, instances: Sequence[TaskInstance], progress: bool = False) -> dict[str, float]:
    """The run's held-out eval on every process of `trainer`'s launch, each scoring its shard of `instances`: greedy
    accuracy per task as `eval_{task}_accuracy`, a tool task's tool-call rate as `eval_{task}_tool_calls`, and
    `eval_{task}_pass@k` when the run's `eval_pass_k` is on (TrainConfig `trainer.cfg`)."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = list(instances)[rank::world]
    score = functools.partial(
        held_out_scores, accelerator.unwrap_model(trainer.model), trainer.processing_class, shard, cfg.max_new_tokens,
        cfg.eval_batch_size, max_tool_calling_iterations=cfg.max_tool_calling_iterations,
        tool_timeout_s=cfg.tool_timeout_s, progress=progress,
        chat_template_kwargs=getattr(trainer.args, "chat_template_kwargs", None),
    )  # fmt: skip
    names = sorted({instance.name for instance in instances})
    greedy = score()
    metrics = reduce_over_processes(accelerator, shard, greedy["accuracy"], "accuracy", names)
    if tool_tasks := sorted({instance.name for instance in instances if instance.uses_tools}):
        metrics |= reduce_over_processes(accelerator, shard, greedy["tool_calls"], "tool_calls", tool_tasks)
    if cfg.eval_pass_k:
        best_of_k = score(samples=cfg.eval_pass_k, temperature=cfg.temperature, seed=cfg.seed + rank)
        metrics |= reduce_over_processes(accelerator, shard, best_of_k["accuracy"], f"pass@{cfg.eval_pass_k}", names)
    return metrics


def reduce_over_processes(
    accelerator: Accelerator, shard: list[TaskInstance], shard_means: dict[str, float], metric: str, names: list[str]
) -> dict[str, float]:
    """`eval_{task}_{metric}` for each task of `names` over all processes' shards, from each shard's per-task means."""
    sizes = [sum(instance.name == name for instance in shard) for name in names]
    sums_and_sizes = torch.tensor(
        [[shard_means.get(name, 0.0) * size, size] for name, size in zip(names, sizes, strict=True)],
        dtype=torch.float64,
        device=accelerator.device,
    )
    totals = accelerator.reduce(sums_and_sizes, reduction="sum").tolist()
    return {f"eval_{name}_{metric}": total / max(n, 1) for name, (total, n) in zip(names, totals, strict=True)}
