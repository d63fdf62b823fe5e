"""How the learner's log-probs are computed, each path with TRL's `(log-probs, entropies, router loss)` result:
`gated_policy_logprobs` (the grad-carrying forward on the rows a loss's `backward_rows` keeps),
`materialized_logprobs` (the reference path through the model's full logits, `chunked_logprobs=False`) and
`shared_prompt_pass` (each prompt through the model once, `shared_prompt=True`), chunked by `in_chunks`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from nanopost_trl import base, trl_bridge
from nanopost_trl.shared_prompt import shared_prompt_logprobs

# rows -> (log-probs, entropies, MoE router loss or None) of those rows
LogprobForward = Callable[[slice | torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def gated_policy_logprobs(
    forward: LogprobForward, backward_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """Policy log-probs and entropies, with the grad-carrying forward only on the rows `backward_rows` keeps.

    `forward(rows)` returns the rows' (log-probs, entropies, router loss); `backward_rows(detached_logprobs,
    detached_entropies)` returns (B,) bool from a no-grad pass, or None for all rows (then a grad-carrying pass runs
    on all). The others keep their (equal) no-grad values, without gradient. Returns the router loss of the
    grad-carrying pass and the kept fraction too (None when all rows ran).

    With no row kept, one row still runs the grad-carrying forward, with weight 0: under DDP or DeepSpeed a
    process's gradient all-reduce is armed by a grad-carrying forward through the wrapped model, and a process that
    skipped it would leave the others waiting in theirs (a hang when only some processes skip every row).
    """
    with torch.no_grad():
        detached_logprobs, detached_entropies, _ = forward(slice(None))
    rows = backward_rows(detached_logprobs, detached_entropies)
    if rows is None:
        return *forward(slice(None)), None
    kept = bool(rows.any())
    live = rows if kept else torch.arange(len(rows), device=rows.device) == 0
    live_logprobs, live_entropies, router_loss = forward(live)
    gated = []
    for detached, live_values in ((detached_logprobs, live_logprobs), (detached_entropies, live_entropies)):
        values = detached.clone()  # no-grad values, live grads (zero ones when no row is kept)
        values[live] = detached[live] + float(kept) * (live_values - live_values.detach())
        gated.append(values)
    router_loss = None if router_loss is None else float(kept) * router_loss
    return gated[0], gated[1], router_loss, rows.float().mean().item()


def declares_backward_rows(loss_fn: base.LossFn) -> bool:
    """Whether the loss overrides `backward_rows` (then a no-grad pass decides the grad-carrying rows)."""
    return type(loss_fn).backward_rows is not base.LossFn.backward_rows


def in_chunks(
    score: Callable[[slice], tuple[torch.Tensor, torch.Tensor | None]], rows: int, batch_size: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """TRL's `(log-probs, entropies or None, router loss)` from `score(rows)`, `batch_size` rows at a time."""
    parts = [score(slice(start, start + (batch_size or rows))) for start in range(0, rows, batch_size or rows)]
    entropies = [part[1] for part in parts]
    return torch.cat([part[0] for part in parts]), None if entropies[0] is None else torch.cat(entropies), None


def materialized_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None,
    compute_entropy: bool,
    temperature: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """The reference path: `micro_batch x (completion + 1) x vocab` logits from the model's own forward, then TRL's
    log-softmax and entropy over them (as TRL did before its fused head). Padding scores 0, as fused."""
    if extra := sorted(name for name, value in kwargs.items() if value is not None and value is not False):
        raise ValueError(f"chunked_logprobs=False supports text-only dense models; got {', '.join(extra)}")

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast():
            logits = model(
                input_ids=input_ids[rows], attention_mask=attention_mask[rows], logits_to_keep=logits_to_keep + 1
            ).logits
        logits = logits[:, :-1].float().contiguous()  # a strided view would be copied by the entropy, again
        completion = slice(-logits_to_keep, None)
        return trl_bridge.full_logits_logprobs(
            logits, input_ids[rows, completion], attention_mask[rows, completion], temperature, compute_entropy
        )

    return in_chunks(score, input_ids.size(0), batch_size)


def shared_prompt_pass(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None,
    compute_entropy: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """TRL's `_get_per_token_logps_and_entropies` through the shared-prompt path (`nanopost_trl.shared_prompt`),
    `batch_size` rows at a time: the prompt (`input_ids[:, :-logits_to_keep]`, left-padded) once per distinct prompt
    of a chunk, then each completion."""
    prompt, completion = slice(None, -logits_to_keep), slice(-logits_to_keep, None)

    def score(rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast():
            return shared_prompt_logprobs(
                model,
                input_ids[rows, prompt],
                attention_mask[rows, prompt],
                input_ids[rows, completion],
                attention_mask[rows, completion],
                compute_entropy,
            )

    return in_chunks(score, input_ids.size(0), batch_size)
