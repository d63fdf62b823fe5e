"""SAPO: a smooth, temperature-controlled gate on the importance ratio in place of the hard clip.

Gao et al. 2025, "Soft Adaptive Policy Optimization" (arXiv 2511.20347), as TRL 1.16 implements `loss_type="sapo"`:

    J = E[ 1/G sum_i 1/|o_i| sum_t f(r_it) A_i ],    f(r) = (4 / tau) sigmoid(tau (r - 1))

with tau = tau_pos for A > 0 and tau_neg otherwise (tau_neg > tau_pos damps negative updates faster). The gate's
gradient f'(r) = 4 sigmoid(1 - sigmoid) r is 1 on-policy (r = 1), like the plain ratio, and decays smoothly as r
leaves 1 instead of dropping to 0 at a clip edge. Aggregation "seq_mean" and tau_pos = 1.0, tau_neg = 1.05 are
TRL's defaults. Equation numbers were not checked (the stored copy we could read is the abstract).
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import masked_mean
from nanopost_trl.losses.surrogate import SurrogateLoss


@dataclasses.dataclass
class SAPOLoss(SurrogateLoss):
    headline_metrics = ("gate_mean",)

    tau_pos: float = 1.0  # temperature for A > 0
    tau_neg: float = 1.05  # temperature for A <= 0

    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        tau = torch.full_like(batch.advantages, self.tau_neg).masked_fill(batch.advantages > 0, self.tau_pos)
        gate = torch.sigmoid(tau * (ratio - 1))
        return -(4 / tau) * gate * batch.advantages, {"gate_mean": masked_mean(gate.detach(), mask)}
