"""CISPO: clip the importance-sampling weight, not the update; every token keeps a gradient.

MiniMax 2025, "MiniMax-M1" (arXiv 2506.13585), the CISPO objective (Sec. 3.1):

    J = E[ 1 / sum_i |o_i| * sum_i sum_t sg(r_hat_it) A_i log pi_theta(o_it) ],    r_hat_it = min(r_it, eps_max)

so per_token = -sg(min(r, eps_high)) A logp, normalised over the step's tokens ("step_token_mean"), as TRL's
`loss_type="cispo"` (its `epsilon_high` is the absolute cap eps_max). eps_high = 5.0 is the value TRL's docs
recommend (from ScaleRL, arXiv 2510.13786); TRL's literal default (epsilon_high = epsilon = 0.2) would cap every
weight below 1. The paper's lower IS bound is unset, as here. Equation numbers were not checked.
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import Aggregation, masked_mean
from nanopost_trl.losses.surrogate import SurrogateLoss


@dataclasses.dataclass
class CISPOLoss(SurrogateLoss):
    headline_metrics = ("clipfrac",)
    trl_metrics = SurrogateLoss.trl_metrics | {"clipfrac": "cispo_clip_ratio"}

    eps_high: float = 5.0  # the cap on the (detached) importance weight
    aggregation: Aggregation = "step_token_mean"

    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        weight = torch.clamp(ratio, max=self.eps_high).detach()
        clipped = ((ratio > self.eps_high) & (batch.advantages > 0)).float()
        return -weight * batch.advantages * batch.policy_logprobs, {"clipfrac": masked_mean(clipped, mask)}
