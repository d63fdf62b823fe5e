"""MaxRL: GRPO's surrogate on advantages that estimate the gradient of log(pass rate) instead of the pass rate.

Tajwar, Zeng et al. 2026, "Maximum Likelihood Reinforcement Learning" (arXiv 2602.02710). The objective is
E_x[log p_theta(x)], p_theta(x) the success probability (eq. 1), whose gradient re-weights each prompt by 1 / p.
With N samples per prompt, K of them successful and S_i = grad log pi(y_i|x), the estimator with control variate is

    g = sum_i (r_i / K - 1 / N) S_i = (1 / N) sum_i A_i S_i,    A_i = (r_i - mean(r)) / mean(r)    (eq. 11)

with g = 0 when K = 0 (Algorithm 1: "A_j = 0 if mean = 0"). So MaxRL is an advantage estimator: everything else
(clip, k3 KL, aggregation, defaults) is `GRPOLoss`, as in the paper's Algorithm 1 ("take a GRPO-style step").

Differences: none in the estimator. It assumes rewards in [0, 1] (a success indicator or a partial-credit score);
a group whose mean reward is <= 0 gets zero advantages. The paper's code divides by (mean + 1e-6) instead.
Equation numbers are those of the authors' preprint source (paper.tex in Zanette-Labs/MaxRL).
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl.losses.grpo import GRPOLoss


@dataclasses.dataclass
class MaxRLLoss(GRPOLoss):
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean_group(r)) / mean_group(r), and 0 for a group with no success (mean <= 0)."""
        mean = rewards.mean(dim=-1, keepdim=True)
        return torch.where(mean > 0, (rewards - mean) / mean, 0.0)  # the 0 / 0 branch is discarded
