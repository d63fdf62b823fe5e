"""GSPO: GRPO's clipped surrogate on one importance ratio per sequence, the length-normalised likelihood ratio.

Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv 2507.18071), eqs. (5) and (7):

    J = E[ 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) ]
    s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| sum_t log(pi_theta(y_it) / pi_old(y_it)))

`GRPOLoss` with `importance_sampling_level="sequence"` and "seq_mean" (the per-token term is constant over a
sequence, so the masked token mean is the sequence's term): TRL's `loss_type="grpo"` with
`importance_sampling_level="sequence"`. eps_low = 3e-4, eps_high = 4e-4 and no KL term are the paper's Sec. 5.1
values, as TRL's paper index reproduces them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from nanopost_trl.losses.grpo import GRPOLoss


@dataclasses.dataclass
class GSPOLoss(GRPOLoss):
    eps_low: float = 3e-4
    eps_high: float = 4e-4
    kl_coef: float | None = 0.0
    importance_sampling_level: Literal["token", "sequence"] = "sequence"
