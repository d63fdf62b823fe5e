"""The per-token frame every built-in loss shares, and the options it applies on top of each loss's policy term.

A subclass gives `policy_term(batch, mask) -> (per_token, kl_weight, metrics)`: its paper's per-token policy loss,
(B, T) or (B, 1), and the per-token factor on the KL term (1; the importance ratio with `kl_ratio_correction`; a
gate that must silence the KL too). The frame then applies, in the order of TRL 1.16's `GRPOTrainer._compute_loss`:

    mask_truncated             a completion cut at max_new_tokens (no end-of-sequence) gets no loss: its tokens leave
                               the mask, hence every normaliser (TRL's `mask_truncated_completions`)
    top_entropy_quantile       per_token *= 0 outside the top quantile of the valid tokens by entropy (Wang et al.
                               2025, "Beyond the 80/20 Rule", arXiv 2506.01939; 0.2 in the paper)
    kl_coef                    per_token += kl_coef * kl_weight * k3 KL to the reference
    aggregation                the scalar (`ops.Aggregation`)
    entropy_coef               loss -= entropy_coef * the masked mean entropy of the micro-batch (over the tokens the
                               entropy mask keeps), not scaled by the aggregation's normaliser: TRL's static bonus;
                               TRL's adaptive controller (`use_adaptive_entropy`) drives this field from the adapter
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.ops import Aggregation, aggregate, high_entropy_mask, kl_to_reference, masked_mean, require


@dataclasses.dataclass
class TokenLoss(base.LossFn):
    """A loss built from a per-token policy term (`policy_term`), with the frame's options (module docstring)."""

    trl_metrics = {"kl_ref": "kl", "policy_loss": "policy_loss"}

    kl_coef: float | None = None  # None: the run's (TrainConfig.kl_coef, or GRPOConfig's beta)
    aggregation: Aggregation = "seq_mean"
    max_new_tokens: int | None = None  # the "constant" normaliser; None: the run's max_new_tokens
    top_entropy_quantile: float = 1.0  # 1: every token
    entropy_coef: float = 0.0
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")

    @abc.abstractmethod
    def policy_term(
        self, batch: base.LearnerBatch, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | float, base.Metrics]:
        """(the per-token policy loss, the per-token factor on the KL term, metrics); `mask` is `loss_mask(batch)`."""

    def loss_mask(self, batch: base.LearnerBatch) -> torch.Tensor:
        """`batch.mask`, less the tokens of truncated completions with `mask_truncated`."""
        if not self.mask_truncated:
            return batch.mask
        truncated = require(batch, "truncated", f"{type(self).__name__}(mask_truncated=True)")
        return batch.mask * ~truncated.unsqueeze(1)

    def __call__(self, batch: base.LearnerBatch) -> tuple[torch.Tensor, base.Metrics]:
        name, mask = type(self).__name__, self.loss_mask(batch)
        per_token, kl_weight, metrics = self.policy_term(batch, mask)
        bonus_mask = mask
        if self.top_entropy_quantile < 1.0:
            entropies = require(batch, "entropies", f"{name}(top_entropy_quantile={self.top_entropy_quantile})")
            entropy_mask = high_entropy_mask(entropies, mask, self.top_entropy_quantile)
            per_token, bonus_mask = per_token * entropy_mask, mask * entropy_mask
            metrics["high_entropy_frac"] = masked_mean(entropy_mask, mask)
        if self.kl_coef:
            kl = kl_to_reference(batch, f"{name}(kl_coef={self.kl_coef})") * kl_weight
            per_token = per_token + self.kl_coef * kl
            metrics["kl_ref"] = masked_mean(kl, mask)
        loss = aggregate(per_token, batch, self.aggregation, self.max_new_tokens, mask)
        if self.entropy_coef:
            entropies = require(batch, "entropies", f"{name}(entropy_coef={self.entropy_coef})")
            entropy = (entropies * bonus_mask).sum() / bonus_mask.sum().clamp(min=1)
            metrics["policy_loss"] = loss.item()
            loss = loss - self.entropy_coef * entropy
        return loss, metrics
