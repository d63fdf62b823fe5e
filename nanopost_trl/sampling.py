"""Fast sampling on the transformers path: each prompt prefilled once per group, tool rounds continued from the cache.

TRL's transformers path (no vLLM) hands `generate` the whole generation batch, in which each prompt appears
`num_generations` times, so each prompt is prefilled that many times; each tool round then generates again from the
whole conversation. `FastSampler` replaces that path (`NanopostGRPOTrainer._generate_single_turn`):
1. the distinct rows of a call run through the model once, all but their last token, and the KV cache is laid out
   for every row that shares them;
2. inside a generation session (`session()`, one `_generate_and_score_completions`) with tools, the cache at the end
   of a call is kept, and the tool loop's next call continues each row from it: only the new tokens (the last
   sampled token, the tool message, the next generation prompt) are prefilled;
3. once half of a `generate` call's rows have ended (EOS), it stops and restarts from its cache on the rows still
   running (`decode`), so ended rows stop costing a forward each step (TRL's batch runs them to its longest row).
Then transformers' `generate` continues from that cache with TRL's own GenerationConfig and the FULL token rows, so
every logits processor and stopping criterion sees what it sees on TRL's path (the repetition penalty counts the
prompt's tokens, stop strings read the whole row); options that count from the start of `generate`
(`COUNTING_OPTIONS`, e.g. `min_new_tokens`) turn 3 off.

Layout: a row is `[pad][cached tokens][pad][new tokens]`, the cached part right-aligned at the cache's width and the
new part at the end, as `generate`'s left padding expects. Position ids count the unmasked tokens (`generate`'s
rule), so a row's token at index i has position i whether its keys were cached or not. With one token new per row
(the first call) the layout is TRL's left padding. Padding is masked, but the repetition penalty reads its token ids:
each row's padding holds the ids it holds on TRL's path (`layout`), and options that read the padding's positions
(`LAYOUT_OPTIONS`) keep every call on TRL's layout. A call continues from the kept cache where that prefills fewer
positions than a fresh shared prefill would; each row reuses its longest common prefix with a kept row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from trl.models import unwrap_model_for_generation

SUPPORTED_ATTENTION = ("eager", "sdpa")  # read a 2D mask with padding between cached and new tokens (tested)
SAMPLING_MODES = (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)
# options that read a row's padding or absolute length, which a continued row's layout changes (`layout` keeps the
# token set only): with one set, each call prefills its rows in full (still each distinct row once)
LAYOUT_OPTIONS = ("no_repeat_ngram_size", "min_length", "sequence_bias")
# options that count from the start of `generate` (or the clock), which `decode`'s restarts would reset
COUNTING_OPTIONS = (
    "min_new_tokens",
    "min_length",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "max_time",
    "watermarking_config",
)


@dataclasses.dataclass
class KeptCache:
    """Cached keys/values of token rows: row r holds `tokens[r]` at its cache columns `columns[r]` (in order)."""

    cache: DynamicCache | None  # (rows, heads, width, head_dim) per layer; None: nothing cached (width 0)
    tokens: list[list[int]]
    columns: list[torch.Tensor]


@dataclasses.dataclass
class Batch:
    """The inputs of one `generate` call: rows laid out around the cached part (see the module docstring)."""

    input_ids: torch.Tensor  # (rows, width)
    attention_mask: torch.Tensor  # (rows, width)
    cache: DynamicCache | None  # the first `cached_width` columns, or None
    cached_width: int


def common_prefix_lengths(rows: Sequence[Sequence[int]], kept: Sequence[Sequence[int]]) -> torch.Tensor:
    """(rows, kept) lengths of the longest common prefix of each row with each kept row."""
    width = max(max(map(len, rows)), max(map(len, kept), default=0))

    def padded(values: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
        return torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    equal = padded(rows, -1)[:, None, :] == padded(kept, -2)[None, :, :]
    return equal.cumprod(dim=-1).sum(dim=-1)


def layout(
    rows: Sequence[Sequence[int]],
    kept: KeptCache,
    sources: Sequence[int],
    reused: Sequence[int],
    pad: int,
    trl_width: int,
) -> Batch:
    """A `Batch` of `rows`, row j's first `reused[j]` tokens from kept row `sources[j]`, at least `trl_width` wide.

    Padding is masked, but logits processors read its token ids (the repetition penalty lowers every id in a row,
    the pad id too, which is often EOS): a row that TRL's left padding to `trl_width` pads holds `pad` there, the
    others their own first token, so each row carries the token set it carries on TRL's path."""
    cached_width = max(reused)
    new_width = max(len(row) - length for row, length in zip(rows, reused, strict=True))
    left = max(trl_width - cached_width - new_width, 0)  # TRL's extra padding (`pad_to_multiple_of`)
    cached_width += left
    device = kept.columns[0].device if kept.columns else torch.device("cpu")
    fill = [[pad if len(row) < trl_width else row[0]] for row in rows]
    input_ids = torch.tensor(fill, dtype=torch.long).repeat(1, cached_width + new_width)
    attention_mask = torch.zeros_like(input_ids)
    columns = torch.zeros(len(rows), cached_width, dtype=torch.long)
    for j, (row, source, length) in enumerate(zip(rows, sources, reused, strict=True)):
        new = len(row) - length
        input_ids[j, cached_width - length : cached_width] = torch.tensor(row[:length], dtype=torch.long)
        input_ids[j, input_ids.size(1) - new :] = torch.tensor(row[length:], dtype=torch.long)
        attention_mask[j, cached_width - length : cached_width] = 1
        attention_mask[j, input_ids.size(1) - new :] = 1
        columns[j, cached_width - length :] = kept.columns[source][:length].cpu()
    cache = None
    if cached_width - left:
        rows_index, columns = torch.tensor(sources, device=device)[:, None], columns.to(device)
        cache = DynamicCache()
        for layer, (keys, values, _) in enumerate(kept.cache):
            # advanced indexing on dims 0 and 2 puts them first: (rows, width, heads, dim) -> (rows, heads, width, dim)
            cache.update(
                keys[rows_index, :, columns].transpose(1, 2), values[rows_index, :, columns].transpose(1, 2), layer
            )
    return Batch(input_ids.to(device), attention_mask.to(device), cache, cached_width)


def prefill(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad: int) -> KeptCache:
    """All but the last token of each of `rows` (distinct) through `model` once, left-padded: their cache."""
    device = next(model.parameters()).device
    heads = [list(row[:-1]) for row in rows]
    width = max(map(len, heads))
    if width == 0:
        return KeptCache(None, heads, [torch.zeros(0, dtype=torch.long, device=device) for _ in heads])
    input_ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads], device=device)
    attention_mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads], device=device)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # generate's: unmasked tokens counted
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    columns = [torch.arange(width - len(h), width, device=device) for h in heads]
    return KeptCache(cache, heads, columns)


def until_eos(completion: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    """The completion up to and including its first EOS token (TRL's completion mask)."""
    for index, token in enumerate(completion):
        if token in eos_token_ids:
            return completion[: index + 1]
    return completion


def model_unsupported(model: torch.nn.Module) -> str | None:
    """None where the fast sampler is exact for `model`; else why it is not."""
    config = getattr(model, "module", model).config
    if config.get_text_config() is not config:
        return f"{config.model_type} is multimodal"
    attention = config._attn_implementation
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r} (the fast sampler runs {', '.join(SUPPORTED_ATTENTION)})"
    layer_types = getattr(config, "layer_types", None)
    other = sorted(set(layer_types) - {"full_attention"}) if layer_types else []
    if other or (layer_types is None and getattr(config, "sliding_window", None) is not None):
        return f"{config.model_type} has {', '.join(other) or 'sliding_attention'} layers (the kept cache is full)"
    return None


def trainer_unsupported(trainer: Any) -> str | None:
    """None where the fast sampler can replace `trainer`'s transformers sampling path; else why it cannot."""
    args = trainer.args
    if args.use_transformers_continuous_batching:
        return "use_transformers_continuous_batching is on (TRL's continuous batching samples)"
    if args.cache_implementation is not None:
        return f"cache_implementation={args.cache_implementation!r} (the fast sampler keeps a DynamicCache)"
    if trainer.is_fsdp_enabled:
        return "FSDP (TRL's generation gathers the sharded weights)"
    mode = trainer.grpo.generation_config.get_generation_mode()
    if mode not in SAMPLING_MODES:
        return f"generation mode {mode.value} (the fast sampler samples or decodes greedily, one sequence a row)"
    return model_unsupported(trainer.accelerator.unwrap_model(trainer.model))


class HalfEnded(StoppingCriteria):
    """Stops `generate` once half of its rows have ended (an EOS after column `start`): the rest go on in a smaller
    batch (`decode`)."""

    def __init__(self, start: int, eos_token_ids: torch.Tensor) -> None:
        self.start, self.eos_token_ids = start, eos_token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        ended = torch.isin(input_ids[:, self.start :], self.eos_token_ids).any(dim=1)
        return torch.full_like(ended, bool(ended.float().mean() >= 0.5))


def shrinks(config: GenerationConfig) -> bool:
    """Whether `decode` may restart `generate` on the rows still running: no option counts from its start."""
    return config.max_new_tokens is not None and not any(getattr(config, name, None) for name in COUNTING_OPTIONS)


@contextlib.contextmanager
def one_uniform_per_row() -> Iterator[None]:
    """Inside the block, `torch.multinomial(probs, 1)` of a CPU (rows, vocabulary) table, the call `generate`'s
    sampling step makes, draws by inverse CDF: one uniform number per row against the row's cumulative probabilities
    (float64), the same categorical distribution. torch's CPU multinomial draws an exponential per vocabulary entry
    instead (6.3M a step on SMOLLM_CPU's 128 rows x 49,152 tokens: a quarter of the fast sampler's time). Other calls
    pass through. It swaps `torch.multinomial` process-wide for the block: no other thread samples meanwhile."""
    draw = torch.multinomial

    def multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples != 1 or probs.dim() != 2 or out is not None or probs.device.type != "cpu":
            return draw(probs, num_samples, replacement, generator=generator, out=out)
        cumulative = probs.double().cumsum(dim=-1)
        uniform = torch.rand(probs.size(0), 1, dtype=torch.float64, generator=generator) * cumulative[:, -1:]
        return torch.searchsorted(cumulative, uniform, right=True).clamp_(max=probs.size(1) - 1)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = draw


def decode(
    model: torch.nn.Module,
    batch: Batch,
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    shrink: bool,
    keep: bool,
) -> tuple[list[list[int]], DynamicCache | None, torch.Tensor | None]:
    """The tokens `generate` samples after each row of `batch` (to `max_new_tokens`, pad after EOS), and with `keep`
    the cache at the end and its attention mask, rows in `batch`'s order.

    With `shrink`, `generate` stops once half of its rows have ended and restarts from its cache on the rest, so ended
    rows stop costing a forward each step (each row's tokens and sampling options are unchanged: every option reads
    the row, and the limit counts the tokens sampled so far); with `keep`, the ended rows' cache is set aside."""
    config = copy.copy(config)
    config.return_dict_in_generate = True  # for the cache; sampling is unchanged
    eos = torch.tensor(list(eos_token_ids), device=batch.input_ids.device)
    input_ids, attention_mask, cache = batch.input_ids, batch.attention_mask, batch.cache
    running, generated = list(range(len(input_ids))), [[] for _ in input_ids]
    parts: list[tuple[list[int], DynamicCache, torch.Tensor]] = []  # ended rows, their cache and mask
    budget = config.max_new_tokens
    while True:
        start = input_ids.size(1)
        with one_uniform_per_row() if config.do_sample else contextlib.nullcontext():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=cache,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([HalfEnded(start, eos)] if shrink else []),
            )
        new = output.sequences[:, start:]
        for row, tokens in zip(running, new.tolist(), strict=True):
            generated[row] += tokens
        attention_mask = torch.nn.functional.pad(attention_mask, (0, new.size(1)), value=1)
        budget = None if budget is None else budget - new.size(1)
        going = ~torch.isin(new, eos).any(dim=1)
        if not shrink or not budget or not going.any():
            if not keep:
                return generated, None, None
            if not parts:
                return generated, output.cache, attention_mask
            return generated, *assembled([*parts, (running, output.cache, attention_mask)])
        if keep:
            ended = (~going).nonzero()[:, 0]
            part = DynamicCache()
            for layer, (keys, values, _) in enumerate(output.cache):
                part.update(keys[ended], values[ended], layer)
            parts.append(([running[i] for i in ended.tolist()], part, attention_mask[ended]))
        kept = going.nonzero()[:, 0]
        output.cache.batch_select_indices(kept)
        input_ids, cache, attention_mask = output.sequences[kept], output.cache, attention_mask[kept]
        running = [running[i] for i in kept.tolist()]
        config.max_new_tokens = budget


def assembled(parts: list[tuple[list[int], DynamicCache, torch.Tensor]]) -> tuple[DynamicCache, torch.Tensor]:
    """One cache and attention mask of the rows of `parts` ((rows, cache, mask) each; the rows of all parts number
    them 0..n-1), in row order, right-padded (masked) to the widest part."""
    width = max(mask.size(1) for _, _, mask in parts)
    order = torch.tensor([row for rows, _, _ in parts for row in rows]).argsort().to(parts[0][2].device)

    def stacked(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        padding = [0, 0] * (tensors[0].dim() - 1 - dim)
        return torch.cat([torch.nn.functional.pad(t, [*padding, 0, width - t.size(dim)]) for t in tensors])[order]

    cache = DynamicCache()
    for layer, layers in enumerate(zip(*(part for _, part, _ in parts), strict=True)):
        keys, values = (stacked([kv[i] for kv in layers], dim=2) for i in (0, 1))
        cache.update(keys, values, layer)
    return cache, stacked([mask for _, _, mask in parts], dim=1)


class FastSampler:
    """`trainer`'s transformers sampling with each row's shared prefix prefilled once (see the module docstring)."""

    def __init__(self, trainer: Any, enabled: bool) -> None:
        """`enabled` (TrainConfig.fast_sampling) on the transformers path; where it cannot apply, TRL's path runs and
        the reason is logged once."""
        self.reason = None if enabled and not trainer.grpo.use_vllm else "off"
        if self.reason is None and (reason := trainer_unsupported(trainer)):
            self.reason = reason
            warnings.warn(f"fast_sampling: off ({reason}); TRL's transformers path samples", stacklevel=3)
        self.keep_cache = bool(trainer.grpo.tools)  # only the tool loop continues a call's rows
        layout_options = [
            name for name in LAYOUT_OPTIONS if self.reason is None and getattr(trainer.grpo.generation_config, name)
        ]
        if self.keep_cache and layout_options:
            self.keep_cache = False
            warnings.warn(
                f"fast_sampling: tool rounds prefill the whole conversation ({', '.join(layout_options)} reads the "
                "padding or the row length, which continuing from the cache changes)",
                stacklevel=3,
            )
        self.pad_to_multiple_of = trainer.grpo.pad_to_multiple_of
        self.kept: KeptCache | None = None
        self.in_session = False
        self.logged: set[str] = set()

    def applies(self, images: Any, multimodal_fields: dict) -> bool:
        """Whether this call takes the fast path (multimodal inputs take TRL's, saying so once)."""
        if self.reason is not None:
            return False
        if images is not None or multimodal_fields:
            if "multimodal" not in self.logged:
                self.logged.add("multimodal")
                warnings.warn("fast_sampling: multimodal inputs take TRL's transformers path", stacklevel=3)
            return False
        return True

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One generation (the weights do not change inside): calls continue from the cache kept by the last; the
        kept cache is released on exit."""
        self.in_session = True
        try:
            yield
        finally:
            self.in_session, self.kept = False, None

    def sample(self, trainer: Any, rows: list[list[int]]) -> list[list[int]]:
        """Completions of `rows` (token ids, each cut after its first EOS), as TRL's transformers path samples them."""
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                generation_kwargs=trainer.grpo.generation_kwargs,
                gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            return self.generate(model, rows, trainer.grpo.generation_config, trainer.grpo.eos_token_ids)

    def generate(
        self, model: torch.nn.Module, rows: list[list[int]], config: GenerationConfig, eos_token_ids: Sequence[int]
    ) -> list[list[int]]:
        """`sample` on an unwrapped model, under no_grad."""
        pad, trl_width = config.pad_token_id, max(map(len, rows))
        if self.pad_to_multiple_of:
            trl_width = -(-trl_width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = self.continued(rows, pad, trl_width) if self.kept is not None else None
        if batch is None:
            distinct = list(dict.fromkeys(map(tuple, rows)))
            source = {row: index for index, row in enumerate(distinct)}
            kept = prefill(model, distinct, pad)
            sources = [source[tuple(row)] for row in rows]
            batch = layout(rows, kept, sources, [len(row) - 1 for row in rows], pad, trl_width)
        keep = self.keep_cache and self.in_session
        generated, cache, mask = decode(model, batch, config, eos_token_ids, shrinks(config), keep)
        completions = [until_eos(row, eos_token_ids) for row in generated]
        if keep:
            self.kept = self.after(cache, mask, rows, completions)
        return completions

    def continued(self, rows: list[list[int]], pad: int, trl_width: int) -> Batch | None:
        """A `Batch` continuing `rows` from the kept cache, or None where a fresh shared prefill is cheaper."""
        kept = self.kept
        prefix = common_prefix_lengths(rows, kept.tokens)
        best, sources = prefix.max(dim=1)
        reused = torch.minimum(best, torch.tensor([len(row) - 1 for row in rows])).tolist()
        continued_positions = len(rows) * max(len(row) - length for row, length in zip(rows, reused, strict=True))
        distinct = set(map(tuple, rows))
        fresh_positions = len(distinct) * (max(map(len, rows)) - 1) + len(rows)
        if continued_positions > fresh_positions:
            return None
        return layout(rows, kept, sources.tolist(), reused, pad, trl_width)

    @staticmethod
    def after(
        cache: DynamicCache, mask: torch.Tensor, rows: list[list[int]], completions: list[list[int]]
    ) -> KeptCache:
        """The cache at the end of `decode` (`mask`: its attention mask, a column wider: the last sampled tokens are
        never fed back): each row's tokens and its completion's but the last."""
        tokens = [row + completion[:-1] for row, completion in zip(rows, completions, strict=True)]
        columns = [row_mask.nonzero()[: len(row_tokens), 0] for row_mask, row_tokens in zip(mask, tokens, strict=True)]
        return KeptCache(cache, tokens, columns)
