"""Kondo: keep only the tokens whose delight is worth a backward pass; the rest get no gradient at all.

Osband 2026, "Does This Gradient Spark Joy?" (arXiv 2603.20526). The Kondo gate compares delight with a compute
price lambda and pays for a backward pass only when the sample is worth it:

    chi = A * (-log pi_theta(a))                G ~ Bernoulli(sigmoid((chi - lambda) / eta))
    g = sum G A grad log pi_theta(a)

Here the "binary top-k" form (eta -> 0, hard threshold): lambda is set so that the round(keep_frac * n) candidates
of highest delight pass (G = 1) and the others do not (G = 0), G detached. A candidate is a valid token
(`unit="token"`, chi_t = A l_t) or a whole completion (`unit="sequence"`, the paper's per-sample gate: chi_i = A_i *
sum_t l_t = A_i * -log pi(y_i|x_i)). per_token = -G A logp (+ kl_coef * kl), normalised over valid tokens by default
(`aggregation="token_mean"`). keep_frac = 1 is plain advantage-weighted PG.

Checked against the paper's abstract (the stored copy we could read shows no equation numbers, so none is quoted).
Differences: kept samples get the plain weight A (the abstract does not say whether the paper also
applies DG's sigmoid weight); the price is a per-batch quantile (a keep fraction), not a fixed lambda, and ties at it
are broken arbitrarily by `topk`; the KL term is gated with the PG term, so that a row whose tokens are all gated off
contributes nothing and needs no backward pass (`backward_rows` finds those rows).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from nanopost_trl import base
from nanopost_trl.losses.frame import TokenLoss
from nanopost_trl.losses.ops import Aggregation, delight, masked_mean


@dataclasses.dataclass
class KondoLoss(TokenLoss):
    headline_metrics = ("kept_frac",)

    keep_frac: float = 0.1  # fraction of candidates (valid tokens or completions) that pay for a backward pass
    unit: Literal["token", "sequence"] = "token"  # what the gate keeps or drops
    aggregation: Aggregation = "token_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unit not in ("token", "sequence"):
            raise ValueError(f"unknown Kondo unit {self.unit!r}; valid: 'token', 'sequence'")

    def gate(self, batch: base.LearnerBatch) -> torch.Tensor:
        """The (B, T) 0/1 gate, detached: 1 on the valid tokens (of `loss_mask`) of the round(keep_frac * n)
        top-delight candidates."""
        mask = self.loss_mask(batch)
        token_mask, chi = mask, delight(batch)
        if self.unit == "sequence":  # one delight per completion: A * -log pi(y|x)
            chi, mask = (chi * mask).sum(-1, keepdim=True), mask.amax(-1, keepdim=True)
        scores = chi.masked_fill(~mask.bool(), -torch.inf).flatten()
        kept = torch.zeros_like(scores)
        kept[scores.topk(round(self.keep_frac * int(mask.sum()))).indices] = 1.0
        return kept.view_as(chi) * token_mask

    def backward_rows(self, batch: base.LearnerBatch) -> torch.Tensor:
        """Sequences with at least one kept token; the others need no backward pass."""
        return self.gate(batch).sum(-1) > 0

    def policy_term(
        self, batch: base.LearnerBatch, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, base.Metrics]:
        gate = self.gate(batch)
        rows = mask.sum(-1) > 0
        metrics = {
            "kept_frac": masked_mean(gate, mask),
            "backward_skipped_frac": ((gate.sum(-1) == 0) & rows).sum().item() / max(int(rows.sum()), 1),
            "delight_mean": masked_mean(delight(batch), mask),
        }
        return -gate * batch.advantages * batch.policy_logprobs, gate, metrics  # the gate silences the KL too
