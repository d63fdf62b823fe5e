"""DAPO: GRPO's clipped surrogate with a higher upper clip, token-level normalisation over the whole step, and
dynamic sampling (groups whose rewards are all equal are dropped).

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476), eq. (8):

    J = E[ 1 / sum_i |o_i| * sum_i sum_t min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) ]
    s.t. 0 < |{o_i : o_i is correct}| < G

with eps_low = 0.2, eps_high = 0.28 (Clip-Higher, Sec. 3.1), the sum over every token of the batch (Token-Level
Policy Gradient Loss, Sec. 3.3: `aggregation="step_token_mean"`, TRL's default `loss_type="dapo"`), no KL term
(Sec. 2.3: `kl_coef=0`), and the constraint enforced by Dynamic Sampling (Sec. 3.2): `keep_groups` drops the groups
whose rewards are all equal (`dynamic_sampling=False` keeps them). The same equation as `GRPOLoss`; only the
defaults and the group filter differ. DAPO's overlong reward shaping (Sec. 3.4) is a reward, not a loss; its
overlong filtering is `mask_truncated=True`.
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl.losses.grpo import GRPOLoss
from nanopost_trl.losses.ops import Aggregation


@dataclasses.dataclass
class DAPOLoss(GRPOLoss):
    eps_high: float = 0.28
    kl_coef: float | None = 0.0
    aggregation: Aggregation = "step_token_mean"
    dynamic_sampling: bool = True  # drop the prompt groups whose rewards are all equal

    def keep_groups(self, rewards: torch.Tensor) -> torch.Tensor | None:
        """(G,) bool: the groups with at least two different rewards (None with dynamic_sampling off)."""
        if not self.dynamic_sampling:
            return None
        return rewards.amax(dim=-1) > rewards.amin(dim=-1)
