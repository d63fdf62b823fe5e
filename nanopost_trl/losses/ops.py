"""Small tensor helpers shared by the built-in losses."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from nanopost_trl import base

# How a (B, T) per-token loss becomes a scalar; each is one of TRL's `loss_type` normalisations:
#   "seq_mean"        mean over sequences of the masked token mean        (TRL "grpo", "sapo")
#   "token_mean"      masked sum / the micro-batch's valid tokens         (TRL "bnpo")
#   "constant"        masked sum / (B * max_new_tokens)                   (TRL "dr_grpo")
#   "step_token_mean" masked sum / batch.tokens_per_micro_batch: after the adapter's accumulation scaling, the step's
#                     token sum / its valid tokens over all processes     (TRL "dapo", "cispo", "vespo")
#   "seq_sum_mean"    mean over sequences of the masked token sum         (TRL "luspo")
Aggregation = Literal["seq_mean", "token_mean", "constant", "step_token_mean", "seq_sum_mean"]
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__


def require(batch: base.LearnerBatch, field: str, setting: str) -> torch.Tensor:
    """`batch.<field>`, or a ValueError naming the field and the loss setting that reads it."""
    value = getattr(batch, field)
    if value is None:
        raise ValueError(f"{setting} needs batch.{field}, which this run did not provide")
    return value


def kl_to_reference(batch: base.LearnerBatch, setting: str = "kl_coef != 0") -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
    log_ratio = require(batch, "reference_logprobs", setting) - batch.policy_logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` (broadcast to the mask) over the valid tokens, as a float for logging."""
    return ((values * mask).sum() / mask.sum().clamp(min=1)).item()


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's mean of a per-token (B, T) quantity over its valid tokens (NaN for none), or a
    per-sequence (B, 1) one as is."""
    if values.shape[-1] == 1:
        return values[:, 0]
    return (values * mask).sum(-1) / mask.sum(-1)


def ratio_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of a per-token (B, T) quantity over the valid tokens, or of a per-sequence (B, 1) one over the
    sequences: how TRL logs statistics of the importance ratio at either `importance_sampling_level`."""
    return values.mean().item() if values.shape[-1] == 1 else masked_mean(values, mask)


def aggregate(
    per_token: torch.Tensor,
    batch: base.LearnerBatch,
    aggregation: str,
    max_new_tokens: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar (see `Aggregation`) over `mask` (default `batch.mask`)."""
    mask = batch.mask if mask is None else mask
    if aggregation == "seq_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "constant":
        if max_new_tokens is None:
            raise ValueError('aggregation="constant" needs max_new_tokens (set it on the loss or in TrainConfig)')
        return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    if aggregation == "step_token_mean":
        require(batch, "num_items_in_batch", 'aggregation="step_token_mean"')
        return (per_token * mask).sum() / batch.tokens_per_micro_batch
    if aggregation == "seq_sum_mean":
        return (per_token * mask).sum(-1).mean()
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(map(repr, AGGREGATIONS))}")


def delight(batch: base.LearnerBatch) -> torch.Tensor:
    """Per-token delight chi = A * l, with l = -sg(logp) the surprisal under the learner's current policy (detached)."""
    return batch.advantages * -batch.policy_logprobs.detach()


def importance_ratio(batch: base.LearnerBatch, mask: torch.Tensor, level: str) -> torch.Tensor:
    """pi_theta / pi_rollout per token, (B, T); or per sequence, (B, 1), as exp(masked mean of the log-ratios)."""
    log_ratio = batch.policy_logprobs - batch.rollout_logprobs
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        return torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
    raise ValueError(f"unknown importance_sampling_level {level!r}; valid: 'token', 'sequence'")


def off_policy_mask(batch: base.LearnerBatch, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1) 0/1, detached: keep a sequence unless A < 0 and its mean KL(rollout || policy) estimate,
    mean_t (log pi_rollout - log pi_theta), exceeds `threshold` (DeepSeek-V3.2's off-policy sequence mask)."""
    kl = torch.nan_to_num(batch.rollout_logprobs - batch.policy_logprobs.detach(), nan=0.0)  # unscored: no evidence
    seq_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((batch.advantages >= 0) | (seq_kl <= threshold)).to(mask.dtype)


def gather_across_processes(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of per-process length over every process (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    sizes = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(values.numel(), device=values.device))
    padded = values.new_zeros(int(max(sizes)))
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes, strict=True)])


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """(B, T) 0/1, detached: the valid tokens whose entropy is >= the (1 - top_quantile) quantile of the valid
    tokens' entropies of this micro-batch over all processes (TRL's `get_high_entropy_mask`, "80/20" rule)."""
    entropies = entropies.detach()
    pooled = gather_across_processes(entropies[mask.bool()])
    if pooled.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pooled, 1 - top_quantile)
    return ((entropies * mask >= threshold) & mask.bool()).to(mask.dtype)
