"""GRPO: PPO's clipped surrogate on group-relative advantages, plus a k3 KL penalty to the reference.

Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300), eq. (3); the clip is Schulman et al. 2017 (PPO), eq. (7):

    J = E[ 1/|o| sum_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) - beta D_KL[pi_theta || pi_ref] ]
    r_t = pi_theta(o_t) / pi_old(o_t),    D_KL ~= exp(logp_ref - logp) - (logp_ref - logp) - 1    (eq. 4, k3)

Aggregations match TRL's `loss_type`: "seq_mean" = "grpo" (mean over sequences of the masked token mean),
"token_mean" = "bnpo" (masked sum / valid tokens), "constant" = "dr_grpo" (masked sum / (B * max_new_tokens)).
`kl_ratio_correction=True` weights the KL term by r_t as TRL does by default (`use_bias_correction_kl`): an
importance-sampling correction of the KL estimate for off-policy samples; off by default, as in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import aggregate, kl_to_reference, masked_mean


@dataclasses.dataclass
class GRPOLoss(base.LossFn):
    headline_metrics = ("clipfrac",)
    corrects_sampler_mismatch = True  # r_t is against the sampler's log-probs (behaviour policy); the clip bounds it

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float | None = None  # None: TrainConfig.kl_coef
    aggregation: Literal["seq_mean", "token_mean", "constant"] = "seq_mean"
    max_new_tokens: int | None = None  # the "constant" normaliser; None: TrainConfig.max_new_tokens
    kl_ratio_correction: bool = False  # weight the KL by the ratio r_t (TRL's `use_bias_correction_kl`)

    def __call__(self, batch: base.LearnerBatch) -> tuple[torch.Tensor, base.Metrics]:
        mask = batch.mask
        ratio = torch.exp(batch.policy_logprobs - batch.rollout_logprobs)
        clipped_ratio = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        per_token = -torch.min(ratio * batch.advantages, clipped_ratio * batch.advantages)
        metrics = {
            "clipfrac": masked_mean(((ratio * batch.advantages) > (clipped_ratio * batch.advantages)).float(), mask)
        }
        if self.kl_coef:
            kl = kl_to_reference(batch)
            per_token = per_token + self.kl_coef * (kl * ratio if self.kl_ratio_correction else kl)
            metrics["kl_ref"] = masked_mean(kl, mask)
        return aggregate(per_token, mask, self.aggregation, self.max_new_tokens), metrics
