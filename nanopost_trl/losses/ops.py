"""Small tensor helpers shared by the built-in losses."""

from __future__ import annotations

import torch

from nanopost_trl import base


def kl_to_reference(batch: base.LearnerBatch) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
    log_ratio = batch.reference_logprobs - batch.policy_logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over the valid tokens, as a float for logging."""
    return ((values * mask).sum() / mask.sum().clamp(min=1)).item()


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_new_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar: "seq_mean", "token_mean" or "constant" (see module docstring)."""
    if aggregation == "seq_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "constant":
        if max_new_tokens is None:
            raise ValueError('aggregation="constant" needs max_new_tokens (set it on the loss or in TrainConfig)')
        return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: 'seq_mean', 'token_mean', 'constant'")


def delight(batch: base.LearnerBatch) -> torch.Tensor:
    """Per-token delight chi = A * l, with l = -sg(logp) the surprisal under the learner's current policy (detached)."""
    return batch.advantages * -batch.policy_logprobs.detach()
