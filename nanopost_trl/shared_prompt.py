"""Each prompt through the model once: the shared-prompt ("Prefix Grouper", Liu et al. 2025) path for log-probs.

A GRPO micro-batch holds several completions of the same prompt, and the unshared forward carries a copy of the
prompt through every layer for each of them. Here the rows that share a prompt become ONE packed sequence:

    prompt[:-1] | prompt[-1] c1[:-1] | prompt[-1] c2[:-1] | ...      (one packed row per distinct prompt)

Each completion segment attends causally to the shared prompt and to itself only, with the position ids it has
alone (the prompt at 0..P-1, the completion after it), so every hidden state equals the unshared one. Each segment
starts with its own copy of the prompt's last token: that position predicts the completion's first token, and a
position can carry one label only. Only the completion positions are scored, by TRL's fused LM head
(`trl.trainer.utils.add_fused_lm_head`, with pre-shifted `shift_labels`).

The mask is built by transformers' own `create_causal_mask` with an `and_mask_function`, so it comes in the format
the model's attention implementation reads (a boolean mask for sdpa, an additive float one for eager); a 4D mask
passed as `attention_mask` is used as-is by every mask creator, sliding-window layers included, which is why those
fall back (`shared_prompt_unsupported`).

Rows are grouped by their prompt tokens wherever they sit in the micro-batch, so the result never depends on the
row order; the saving is complete when a micro-batch holds whole groups (`shuffle_whole_groups`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask

IGNORE_INDEX = -100  # the label TRL's fused head skips
PADDING_SEGMENT = -1  # packed rows are right-padded to the longest; padding attends like a segment of its own
SUPPORTED_ATTENTION = ("eager", "sdpa")  # implementations that read a dense 4D mask


@dataclasses.dataclass
class PackedGroups:
    """The rows of a micro-batch packed by prompt: one row per distinct prompt, right-padded to the longest."""

    input_ids: torch.Tensor  # (groups, length)
    position_ids: torch.Tensor  # (groups, length): each token's position in its unshared row, left padding stripped
    segment_ids: torch.Tensor  # (groups, length): 0 the shared prompt, r + 1 row r's completion, -1 padding
    shift_labels: torch.Tensor  # (groups, length): the next token each position predicts; -100 where none is scored
    token_group: torch.Tensor  # (rows, completion): the packed row holding each completion token's prediction
    token_position: torch.Tensor  # (rows, completion): its position in that packed row (0 on padding)


def _check_padding(mask: torch.Tensor, left: bool, name: str) -> torch.Tensor:
    """Per-row lengths of a 0/1 mask, which must be padded on one side only."""
    lengths = mask.sum(dim=1)
    columns = torch.arange(mask.size(1), device=mask.device)
    expected = columns >= mask.size(1) - lengths[:, None] if left else columns < lengths[:, None]
    if not torch.equal(mask.bool(), expected):
        side = "left" if left else "right"
        raise ValueError(f"shared-prompt log-probs need {name} padded on the {side} only (ones, then zeros)")
    return lengths


def pack_by_prompt(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> PackedGroups:
    """Pack rows sharing a prompt into one sequence each (see the module docstring for the layout)."""
    prompt_lengths = _check_padding(prompt_mask, left=True, name="prompt_mask").tolist()
    completion_lengths = _check_padding(completion_mask, left=False, name="completion_mask").tolist()
    if min(prompt_lengths) == 0:
        raise ValueError("shared-prompt log-probs need at least one prompt token in every row")
    rows, completion_width = completion_ids.shape
    prompts, completions = prompt_ids.tolist(), completion_ids.tolist()

    groups: dict[tuple[int, ...], int] = {}
    tokens: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []
    labels: list[list[int]] = []
    token_group = torch.zeros(rows, completion_width, dtype=torch.long)
    token_position = torch.zeros(rows, completion_width, dtype=torch.long)
    for row, (prompt_length, completion_length) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        prompt = tuple(prompts[row][-prompt_length:])
        if prompt not in groups:
            groups[prompt] = len(tokens)
            tokens.append(list(prompt[:-1]))
            positions.append(list(range(prompt_length - 1)))
            segments.append([0] * (prompt_length - 1))
            labels.append([IGNORE_INDEX] * (prompt_length - 1))
        group = groups[prompt]
        if completion_length == 0:  # nothing to score (a truncated completion TRL masked out)
            continue
        completion = completions[row][:completion_length]
        start = len(tokens[group])
        tokens[group] += [prompt[-1], *completion[:-1]]
        positions[group] += range(prompt_length - 1, prompt_length - 1 + completion_length)
        segments[group] += [row + 1] * completion_length
        labels[group] += completion
        token_group[row, :completion_length] = group
        token_position[row, :completion_length] = torch.arange(start, start + completion_length)

    length = max(len(group_tokens) for group_tokens in tokens)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([row + [fill] * (length - len(row)) for row in values], device=prompt_ids.device)

    device = prompt_ids.device
    return PackedGroups(
        input_ids=padded(tokens, 0),
        position_ids=padded(positions, 0),
        segment_ids=padded(segments, PADDING_SEGMENT),
        shift_labels=padded(labels, IGNORE_INDEX),
        token_group=token_group.to(device),
        token_position=token_position.to(device),
    )


def shared_prompt_attention_mask(model: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """The 4D mask of `packed` in the format `model`'s attention implementation reads: causal, and a token sees the
    shared prompt and its own segment only. Padding sees the prompt and itself, so no softmax row is empty."""
    segment_ids = packed.segment_ids

    def prompt_or_same_segment(batch_idx, head_idx, q_idx, kv_idx):
        kv_segment = segment_ids[batch_idx, kv_idx]
        return (kv_segment == 0) | (kv_segment == segment_ids[batch_idx, q_idx])

    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers hold the config on `module`
    embedding_dtype = model.get_input_embeddings().weight.dtype
    shape_probe = torch.empty(*segment_ids.shape, 0, dtype=embedding_dtype, device=segment_ids.device)
    return create_causal_mask(
        config=model.config,
        inputs_embeds=shape_probe,  # read for its batch size, length, dtype (eager's -inf) and device only
        attention_mask=None,
        cache=None,
        and_mask_function=prompt_or_same_segment,
        allow_is_causal_skip=False,
    )


def shared_prompt_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the completions, `(rows, completion)`, 0 on padding: what TRL's
    `GRPOTrainer._get_per_token_logps_and_entropies` returns for the unpacked rows, with each distinct prompt through
    the model once.

    `model` carries TRL's fused LM head (`add_fused_lm_head`, with "entropy" among its outputs for
    `compute_entropy`; it holds the temperature); wrap the call in the accelerator's autocast and the adapter's
    `fused_head_tiles` as the unshared call is. Gradients flow when grad is enabled."""
    packed = pack_by_prompt(prompt_ids, prompt_mask, completion_ids, completion_mask)
    outputs = model(
        input_ids=packed.input_ids,
        attention_mask=shared_prompt_attention_mask(model, packed),
        position_ids=packed.position_ids,
        shift_labels=packed.shift_labels,
        fused_lm_head=True,
    )
    if compute_entropy and outputs.entropy is None:
        raise ValueError('compute_entropy=True needs the fused LM head added with "entropy" among its outputs')
    scored = completion_mask.bool()

    def unpack(per_position: torch.Tensor) -> torch.Tensor:
        return torch.where(scored, per_position[packed.token_group, packed.token_position], 0.0)

    return unpack(outputs.log_probs), unpack(outputs.entropy) if compute_entropy else None


def shared_prompt_unsupported(model: torch.nn.Module) -> str | None:
    """None where the shared-prompt path is exact for `model`; else why it is not (the caller falls back)."""
    config = getattr(model, "module", model).config
    if config.get_text_config() is not config:
        return f"{config.model_type} is multimodal: its masks and positions depend on the image tokens"
    attention = config._attn_implementation
    if attention not in SUPPORTED_ATTENTION:
        return (
            f"attention implementation {attention!r} reads no custom 4D mask (only {', '.join(SUPPORTED_ATTENTION)} do)"
        )
    layer_types = getattr(config, "layer_types", None)
    local = sorted(set(layer_types) - {"full_attention"}) if layer_types else []
    if local or (layer_types is None and getattr(config, "sliding_window", None) is not None):
        return f"{config.model_type} has {', '.join(local) or 'sliding_attention'} layers, which a 4D mask overrides"
    return None


def shuffle_whole_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """TRL's `shuffle_sequence_dict` (which permutes rows), permuting whole groups of `group_size` consecutive rows
    instead, so that splitting the result into micro-batches of a multiple of `group_size` rows keeps groups whole."""
    rows = len(next(value for value in batch.values() if value is not None))
    if rows % group_size:
        raise ValueError(f"{rows} rows do not split into whole groups of {group_size}")
    # the same draw as TRL's (one randperm of the rows), so a seed gives the same random stream with either shuffle
    starts = torch.argsort(torch.randperm(rows)[::group_size]) * group_size
    permutation = (starts[:, None] + torch.arange(group_size)).flatten()

    def permute(value: Any) -> Any:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation]

    return {key: permute(value) for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class SharedPromptSetting:
    """Whether the log-prob passes share each prompt (`applies`), and whether TRL's micro-batches can hold whole
    prompt groups (`whole_groups`: then its shuffle permutes groups, so each prompt is computed once per step)."""

    applies: bool
    whole_groups: bool


def shared_prompt_setting(cfg, model: torch.nn.Module, args) -> SharedPromptSetting:
    """`cfg.shared_prompt` where it is exact for `model` (else off, saying why once) and with TRL's batching `args`."""
    if not cfg.shared_prompt or not cfg.chunked_logprobs:
        return SharedPromptSetting(False, False)
    if reason := shared_prompt_unsupported(model):
        warnings.warn(f"shared_prompt: off for this model ({reason}); each row carries its own prompt", stacklevel=3)
        return SharedPromptSetting(False, False)
    per_process = args.per_device_train_batch_size * args.steps_per_generation
    group = args.num_generations
    return SharedPromptSetting(True, args.per_device_train_batch_size % group == 0 and per_process % group == 0)
