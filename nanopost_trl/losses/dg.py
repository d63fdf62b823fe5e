"""DG: the Delightful Policy Gradient, REINFORCE with each token's term gated by a sigmoid of its delight.

Osband 2026, "Delightful Policy Gradient" (arXiv 2603.14608), Sec. 2; reused unchanged under actor staleness, actor
bugs and reward corruption in "Delightful Distributed Policy Gradient" (arXiv 2603.20521):

    l_t = -log pi_theta(a_t)          surprisal under the learner's current policy (no behaviour probabilities)
    chi_t = A l_t                     delight
    w_t = sigmoid(chi_t / eta)        gate, eta a temperature
    g = sum_t w_t A grad log pi_theta(a_t)

so per_token = -sg(w_t) A logp_t + kl_coef * kl (k3, as GRPO). A rare success (A > 0, large l) gets w -> 1, a rare
failure (A < 0, large l) w -> 0; eta -> inf gives w = 1/2, i.e. half of REINFORCE.

Checked against the paper's abstract (the stored copy we could read shows no equation numbers, so none is quoted).
Differences: the paper's U is a generic advantage; here it is the loss's group advantage (GRPO's by default), and
the token terms go through the same per-token frame as GRPO (`frame.TokenLoss`: aggregation, KL, truncation,
entropy options). No importance ratio: `rollout_logprobs`
is unused, as in the paper.
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.frame import TokenLoss
from nanopost_trl.losses.ops import delight, masked_mean


@dataclasses.dataclass
class DGLoss(TokenLoss):
    headline_metrics = ("gate_mean",)

    eta: float = 1.0  # gate temperature

    def gate(self, batch: base.LearnerBatch) -> torch.Tensor:
        """The (B, T) gate w = sigmoid(delight / eta), detached."""
        return torch.sigmoid(delight(batch) / self.eta)

    def policy_term(self, batch: base.LearnerBatch, mask: torch.Tensor) -> tuple[torch.Tensor, float, base.Metrics]:
        gate = self.gate(batch)
        metrics = {"gate_mean": masked_mean(gate, mask), "delight_mean": masked_mean(delight(batch), mask)}
        return -gate * batch.advantages * batch.policy_logprobs, 1.0, metrics
