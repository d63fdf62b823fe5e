"""Chat templates for tool tasks: one that renders tools and tool results (`use_chat_template`: a template TRL ships,
by name, or a .jinja file), and a parser TRL knows for the model's tool calls (`check_tool_template`, which sets it
as TRL would), else a clear error before training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nanopost_trl import trl_bridge


def chat_template_text(template: str) -> str:
    """The text of a TRL-shipped chat template (by name) or of a .jinja file; an unknown one raises ValueError."""
    shipped = trl_bridge.shipped_chat_templates()
    if template in shipped:
        return shipped[template].read_text()
    if template.endswith(".jinja") and Path(template).expanduser().is_file():
        return Path(template).expanduser().read_text()
    raise ValueError(f"unknown chat template {template!r}: a .jinja file, or one of TRL's: {', '.join(shipped)}")


def use_chat_template(tokenizer: Any, template: str, model: str) -> None:
    """Give `tokenizer` the chat template `template`: a TRL-shipped name ('qwen2_5': ChatML with `<tool_call>` tags,
    for ChatML models such as SmolLM2) or a .jinja file. Its `<|...|>` markers must be tokens of the model's own
    vocabulary, i.e. the template must be of the model's chat format."""
    text = chat_template_text(template)
    vocabulary = tokenizer.get_vocab()
    missing = sorted(set(re.findall(r"<\|[A-Za-z_]+\|>", text)) - vocabulary.keys())
    if missing:
        raise ValueError(
            f"chat template {template!r} uses {', '.join(missing)}, which are not tokens of {model!r}: use a template "
            "of the model's own chat format"
        )
    tokenizer.chat_template = text


def check_tool_template(tokenizer: Any, model: str) -> None:
    """A tool task needs a template that renders tool calls and results, and a parser for the model's tool calls
    (set here, as TRL would, by `add_response_schema`): fail before training, naming the model and the fix."""
    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    fix = (
        "set TrainConfig.chat_template (--chat_template) to a tool-capable template of the model's chat format, e.g. "
        "'qwen2_5' for a ChatML model such as SmolLM2-135M-Instruct (TRL's Qwen2.5 template: JSON tool calls in "
        "<tool_call> tags)"
    )
    if not supports_tool_calling(tokenizer):
        raise ValueError(f"the chat template of {model!r} cannot render tool calls and tool results: {fix}")
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        try:
            add_response_schema(tokenizer)
        except ValueError:
            raise ValueError(
                f"TRL has no parser for the tool calls of {model!r}'s chat template (it knows the templates it ships): "
                f"{fix}, or set tokenizer.response_template"
            ) from None


def set_up_chat_template(tokenizer: Any, template: str | None, model: str, uses_tools: bool) -> None:
    """A run's chat template on `tokenizer`: `template` (`TrainConfig.chat_template`; None keeps the model's own),
    checked for tool calls where the run has tool tasks (`uses_tools`)."""
    if template is not None:
        use_chat_template(tokenizer, template, model)
    if uses_tools:
        check_tool_template(tokenizer, model)


def tool_loop_template(tokenizer: Any) -> str | None:
    """The chat template TRL's tool loop renders with, as GRPOTrainer picks it: None (the tokenizer's own) where that
    one is prefix-preserving, else TRL's training version of it (ValueError where TRL has none, as GRPOTrainer)."""
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

    return None if is_chat_template_prefix_preserving(tokenizer) else get_training_chat_template(tokenizer)


def tool_call_marker(tokenizer: Any) -> str | None:
    """The text that opens a tool call in the tokenizer's response parser ('<tool_call>'), if it names one."""
    template = getattr(tokenizer, "response_template", None) or {}
    return template.get("fields", {}).get("tool_calls", {}).get("open")
