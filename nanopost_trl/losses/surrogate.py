"""The importance-ratio losses' shared frame, and the options TRL applies on top of every `loss_type`.

A subclass gives `surrogate(batch, ratio, mask) -> (per_token, metrics)`, the paper's per-token policy term on the
importance ratio r = pi_theta / pi_rollout (per token, or per sequence with `importance_sampling_level="sequence"`).
This frame then applies, in the order of TRL 1.16's `GRPOTrainer._compute_loss`:

    mask_truncated             a completion cut at max_new_tokens (no end-of-sequence) gets no loss: its tokens leave
                               the mask, hence every normaliser (TRL's `mask_truncated_completions`)
    off_policy_mask_threshold  per_token *= 0 for a sequence with A < 0 whose mean log(pi_rollout / pi_theta) exceeds
                               it (DeepSeek-V3.2, arXiv 2512.02556, eq. 9)
    top_entropy_quantile       per_token *= 0 outside the top quantile of the valid tokens by entropy (Wang et al.
                               2025, "Beyond the 80/20 Rule", arXiv 2506.01939; 0.2 in the paper)
    kl_coef                    per_token += kl_coef * k3 KL to the reference (times r with `kl_ratio_correction`)
    aggregation                the scalar (`ops.Aggregation`)
    entropy_coef               loss -= entropy_coef * the masked mean entropy of the micro-batch (over the tokens the
                               entropy mask keeps), not scaled by the aggregation's normaliser: TRL's static bonus

TRL's adaptive entropy coefficient (`use_adaptive_entropy`) needs the step boundary and a window over micro-batches,
which a loss does not see; it is not offered.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Literal

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import (
    Aggregation,
    aggregate,
    high_entropy_mask,
    importance_ratio,
    kl_to_reference,
    masked_mean,
    off_policy_mask,
    require,
)


@dataclasses.dataclass
class SurrogateLoss(base.LossFn):
    corrects_sampler_mismatch = True  # r is against the sampler's log-probs (the behaviour policy)
    trl_metrics = {"kl_ref": "kl", "policy_loss": "policy_loss"}

    kl_coef: float | None = None  # None: TrainConfig.kl_coef
    aggregation: Aggregation = "seq_mean"
    max_new_tokens: int | None = None  # the "constant" normaliser; None: TrainConfig.max_new_tokens
    kl_ratio_correction: bool = False  # weight the KL by the ratio r (TRL's `use_bias_correction_kl`)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    off_policy_mask_threshold: float | None = None  # None: off
    top_entropy_quantile: float = 1.0  # 1: every token
    entropy_coef: float = 0.0
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"unknown importance_sampling_level {self.importance_sampling_level!r}; valid: 'token', 'sequence'"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")

    @abc.abstractmethod
    def surrogate(
        self, batch: base.LearnerBatch, ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, base.Metrics]:
        """The per-token policy loss, (B, T) or (B, 1), from the ratio ((B, T) or (B, 1)), and its metrics; `mask` is
        the loss mask (`loss_mask`)."""

    def loss_mask(self, batch: base.LearnerBatch) -> torch.Tensor:
        """`batch.mask`, less the tokens of truncated completions with `mask_truncated`."""
        if not self.mask_truncated:
            return batch.mask
        truncated = require(batch, "truncated", f"{type(self).__name__}(mask_truncated=True)")
        return batch.mask * ~truncated.unsqueeze(1)

    def __call__(self, batch: base.LearnerBatch) -> tuple[torch.Tensor, base.Metrics]:
        name, mask = type(self).__name__, self.loss_mask(batch)
        ratio = importance_ratio(batch, mask, self.importance_sampling_level)
        per_token, metrics = self.surrogate(batch, ratio, mask)
        if self.off_policy_mask_threshold is not None:
            kept = off_policy_mask(batch, mask, self.off_policy_mask_threshold)
            per_token = per_token * kept
            metrics["off_policy_masked_frac"] = 1 - kept.mean().item()
        bonus_mask = mask
        if self.top_entropy_quantile < 1.0:
            entropies = require(batch, "entropies", f"{name}(top_entropy_quantile={self.top_entropy_quantile})")
            entropy_mask = high_entropy_mask(entropies, mask, self.top_entropy_quantile)
            per_token, bonus_mask = per_token * entropy_mask, mask * entropy_mask
            metrics["high_entropy_frac"] = masked_mean(entropy_mask, mask)
        if self.kl_coef:
            kl = kl_to_reference(batch, f"{name}(kl_coef={self.kl_coef})")
            kl = kl * ratio if self.kl_ratio_correction else kl
            per_token = per_token + self.kl_coef * kl
            metrics["kl_ref"] = masked_mean(kl, mask)
        loss = aggregate(per_token, batch, self.aggregation, self.max_new_tokens, mask)
        if self.entropy_coef:
            entropies = require(batch, "entropies", f"{name}(entropy_coef={self.entropy_coef})")
            entropy = (entropies * bonus_mask).sum() / bonus_mask.sum().clamp(min=1)
            metrics["policy_loss"] = loss.item()
            loss = loss - self.entropy_coef * entropy
        return loss, metrics
