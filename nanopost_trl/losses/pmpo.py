"""PMPO: maximise the likelihood of accepted completions, minimise that of rejected ones, anchored to the reference.

Abdolmaleki et al. 2024, "Preference Optimization as Probabilistic Inference" (arXiv 2410.04166; v3 retitled
"Learning from negative feedback, or positive feedback or both"), eq. (10):

    J(theta) = alpha E_{y ~ D_a}[log pi_theta(y|x)] - (1 - alpha) E_{y ~ D_r}[log pi_theta(y|x)]
               - beta KL(pi_ref(.|x) || pi_theta(.|x))

Labels come from the `advantages` hook: +1 accepted, -1 rejected, 0 neither. With `threshold=None` a completion is
accepted if its reward is above its group's mean and rejected if below (a group where every reward is equal gives no
signal, as in GRPO); with a float, accepted iff r >= threshold and rejected otherwise (threshold=1.0 for exact-match
rewards: every failure is a negative, even in an all-fail group). For binary rewards both agree on mixed groups.
So per_token = -(alpha [A > 0] / f_acc - (1 - alpha) [A < 0] / f_rej) logp + kl_coef * kl, with f_acc, f_rej the
fractions of the batch's sequences accepted / rejected: each expectation is a mean over its own set, as in the paper
(a shared normaliser would let the usually larger rejected set dominate when successes are rare; on the embedded task
that version did not learn). `aggregation="constant"` makes the batch sum of token log-probs the sequence
log-likelihood log pi(y|x), up to the constant 1 / (B * max_new_tokens). The sets are counted per micro-batch.
The KL is the k3
term of GRPO: its value estimates KL(pi_theta || pi_ref), but its gradient through logp, on samples from pi_theta,
is an unbiased estimate of grad KL(pi_ref || pi_theta), the paper's direction. The paper requires beta > 0 when
learning from negatives; kl_coef = 0 is allowed but may collapse the policy. The equation number is as cited by a
summary of v3; the stored copy we could read stops at the abstract.
"""

from __future__ import annotations

import dataclasses

import torch

from nanopost_trl import base
from nanopost_trl.losses.frame import TokenLoss
from nanopost_trl.losses.ops import Aggregation


@dataclasses.dataclass
class PMPOLoss(TokenLoss):
    headline_metrics = ("accepted_frac",)

    alpha: float = 0.5  # weight on accepted samples; 1 - alpha on rejected ones
    threshold: float | None = None  # None: accept above the group mean; a float: accept iff reward >= threshold
    aggregation: Aggregation = "constant"

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(G, K) rewards -> (G, K) labels: +1 accepted, -1 rejected, 0 neither."""
        if self.threshold is None:
            mean = rewards.mean(dim=-1, keepdim=True)
            return torch.sign(rewards - mean) * ~torch.isclose(rewards, mean)  # ties (to rounding): 0
        return torch.where(rewards >= self.threshold, 1.0, -1.0).to(rewards.dtype)

    def policy_term(self, batch: base.LearnerBatch, mask: torch.Tensor) -> tuple[torch.Tensor, float, base.Metrics]:
        logp = batch.policy_logprobs
        accepted, rejected = (batch.advantages > 0).type_as(logp), (batch.advantages < 0).type_as(logp)
        accepted_frac, rejected_frac = accepted.mean(), rejected.mean()
        # E_acc and E_rej are each a mean over their own set: weight a row by 1 / (fraction of rows in its set)
        accepted_weight = self.alpha * accepted / accepted_frac.clamp(min=1e-8)
        rejected_weight = (1 - self.alpha) * rejected / rejected_frac.clamp(min=1e-8)
        metrics = {"accepted_frac": accepted_frac.item(), "rejected_frac": rejected_frac.item()}
        return -(accepted_weight - rejected_weight) * logp, 1.0, metrics
