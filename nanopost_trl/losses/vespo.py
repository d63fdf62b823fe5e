"""VESPO: REINFORCE weighted by a smooth gamma-shaped function of the sequence importance weight.

"Variational Sequence-Level Soft Policy Optimization" (arXiv 2602.10693), as TRL 1.16 implements
`loss_type="vespo"` (`GRPOTrainer.get_gamma_weights`):

    w_i = pi_theta(y_i|x) / pi_old(y_i|x) = exp(sum_t log r_it)          (not length-normalised)
    phi(w) = exp(lambda) w^k exp(-lambda w)                             (phi(1) = 1; detached)
    per_token = -phi(w_i) A_i log pi_theta(o_it)

with (k, lambda) = (k_pos, lambda_pos) = (2, 3) for A >= 0 and (k_neg, lambda_neg) = (3, 2) for A < 0 (TRL's
defaults): phi falls to 0 both for w -> 0 (power k) and w -> inf (decay lambda). As TRL, log r_it is clamped to
[-20, 20] and log w to [log 1e-8, 20]; "step_token_mean" aggregation. Difference: TRL adds vLLM's token-level
importance ratio log(pi_old / pi_sampler) into log w; here `rollout_logprobs` already are the sampler's when vLLM
runs, so log r is log(pi_theta / pi_sampler) directly, without TRL's truncation or masking of that factor
(`corrects_sampler_mismatch`). Equation numbers were not checked (the stored copy we could read is the abstract).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import Aggregation
from nanopost_trl.losses.surrogate import SurrogateLoss

MIN_LOG_WEIGHT = math.log(1e-8)


@dataclasses.dataclass
class VESPOLoss(SurrogateLoss):
    headline_metrics = ("phi_mean",)
    trl_metrics = SurrogateLoss.trl_metrics | {"phi_mean": "vespo/phi_seq_mean"}

    k_pos: float = 2.0
    lambda_pos: float = 3.0
    k_neg: float = 3.0
    lambda_neg: float = 2.0
    aggregation: Aggregation = "step_token_mean"

    def gamma_weights(self, batch: base.LearnerBatch, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1) phi(w), detached."""
        log_ratio = torch.clamp(batch.policy_logprobs.detach() - batch.rollout_logprobs, -20.0, 20.0)
        log_w = torch.clamp((log_ratio * mask).sum(-1, keepdim=True), MIN_LOG_WEIGHT, 20.0)
        nonneg = batch.advantages >= 0
        k = torch.full_like(log_w, self.k_neg).masked_fill(nonneg, self.k_pos)
        lam = torch.full_like(log_w, self.lambda_neg).masked_fill(nonneg, self.lambda_pos).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        phi = self.gamma_weights(batch, mask)
        return -phi * batch.advantages * batch.policy_logprobs, {"phi_mean": phi.mean().item()}
