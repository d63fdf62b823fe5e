"""GRPO: PPO's clipped surrogate on group-relative advantages, plus a k3 KL penalty to the reference.

Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300), eq. (3); the clip is Schulman et al. 2017 (PPO), eq. (7):

    J = E[ 1/|o| sum_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) - beta D_KL[pi_theta || pi_ref] ]
    r_t = pi_theta(o_t) / pi_old(o_t),    D_KL ~= exp(logp_ref - logp) - (logp_ref - logp) - 1    (eq. 4, k3)

Aggregations match TRL's `loss_type`: "seq_mean" = "grpo" (mean over sequences of the masked token mean),
"token_mean" = "bnpo" (masked sum / valid tokens), "constant" = "dr_grpo" (masked sum / (B * max_new_tokens)),
"step_token_mean" = "dapo" (see `Loss.DAPO`), "seq_sum_mean" = "luspo" (see `Loss.LUSPO`).
`kl_ratio_correction=True` weights the KL term by r_t as TRL does by default (`use_bias_correction_kl`): an
importance-sampling correction of the KL estimate for off-policy samples; off by default, as in the paper.
`importance_sampling_level="sequence"` uses GSPO's sequence ratio (see `Loss.GSPO`). `delta` is INTELLECT-2's
two-sided clip (arXiv 2505.07291): r_t is also capped at delta in the unclipped branch, bounding the loss of a
negative-advantage token whose ratio explodes (TRL's `delta`; set it above 1 + eps_high). The options shared with
the other ratio losses (off-policy mask, entropy mask and bonus, truncation) are `SurrogateLoss`'s.
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import ratio_mean, sequence_means
from nanopost_trl.losses.surrogate import SurrogateLoss


@dataclasses.dataclass
class GRPOLoss(SurrogateLoss):
    headline_metrics = ("clipfrac",)
    trl_metrics = SurrogateLoss.trl_metrics | {
        "clipfrac": "clip_ratio/region_mean",
        "clip_low": "clip_ratio/low_mean",
        "clip_high": "clip_ratio/high_mean",
        "clip_low_min": "clip_ratio/low_min",
        "clip_high_max": "clip_ratio/high_max",
    }

    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None  # two-sided clip: cap r at delta in the unclipped branch; None: off

    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        clipped_ratio = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        if self.delta is not None:
            ratio = torch.clamp(ratio, max=self.delta)
        per_token = -torch.min(ratio * batch.advantages, clipped_ratio * batch.advantages)
        # the clipped tokens (or sequences): below the range with A < 0, above it with A > 0
        low = ((ratio < 1 - self.eps_low) & (batch.advantages < 0)).float()
        high = ((ratio > 1 + self.eps_high) & (batch.advantages > 0)).float()
        metrics = {
            "clipfrac": ratio_mean(torch.maximum(low, high), mask),
            "clip_low": ratio_mean(low, mask),
            "clip_high": ratio_mean(high, mask),
        }
        low_per_sequence, high_per_sequence = sequence_means(low, mask), sequence_means(high, mask)
        scored = ~low_per_sequence.isnan()
        if scored.any():  # the extremes over the sequences with a valid token
            metrics["clip_low_min"] = low_per_sequence[scored].min().item()
            metrics["clip_high_max"] = high_per_sequence[scored].max().item()
        return per_token, metrics
