"""The importance-ratio losses' shared frame: the ratio, its KL correction, and DeepSeek-V3.2's off-policy mask, on
top of the per-token frame every built-in shares (`frame.TokenLoss`: truncation, entropy mask and bonus, KL,
aggregation).

A subclass gives `surrogate(batch, ratio, mask) -> (per_token, metrics)`, the paper's per-token policy term on the
importance ratio r = pi_theta / pi_rollout (per token, or per sequence with `importance_sampling_level="sequence"`).
This frame then applies, in the order of TRL 1.16's `GRPOTrainer._compute_loss`:

    off_policy_mask_threshold  per_token *= 0 for a sequence with A < 0 whose mean log(pi_rollout / pi_theta) exceeds
                               it (DeepSeek-V3.2, arXiv 2512.02556, eq. 9)
    kl_ratio_correction        the KL term weighted by r (TRL's `use_bias_correction_kl`)

and `TokenLoss` the rest.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal

import torch

from nanopost_trl import base
from nanopost_trl.losses.frame import TokenLoss
from nanopost_trl.losses.ops import importance_ratio, off_policy_mask


@dataclasses.dataclass
class SurrogateLoss(TokenLoss):
    corrects_sampler_mismatch = True  # r is against the sampler's log-probs (the behaviour policy)

    kl_ratio_correction: bool = False  # weight the KL by the ratio r (TRL's `use_bias_correction_kl`)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    off_policy_mask_threshold: float | None = None  # None: off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}; valid: 'token', 'sequence'"
            )

    @abc.abstractmethod
    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        """The per-token policy loss, (B, T) or (B, 1), from the ratio ((B, T) or (B, 1)), and its metrics; `mask` is
        the loss mask (`loss_mask`)."""

    def policy_term(
        self, batch: base.LearnerBatch, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | float, base.Metrics]:
        ratio = importance_ratio(batch, mask, self.importance_sampling_level)
        per_token, metrics = self.surrogate(batch, ratio, mask)
        if self.off_policy_mask_threshold is not None:
            kept = off_policy_mask(batch, mask, self.off_policy_mask_threshold)
            per_token = per_token * kept
            metrics["off_policy_masked_frac"] = 1 - kept.mean().item()
        return per_token, ratio if self.kl_ratio_correction else 1.0, metrics
