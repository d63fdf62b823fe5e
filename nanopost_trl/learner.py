"""The learner batch: what the adapter adds to TRL's tensors before a `LossFn` sees them, and what it checks after.

- `loss_advantages`, `kept_rows`, `truncated`: the loss's own advantages, the rows of the groups it keeps, and the
  completions cut at `max_new_tokens`.
- `sampler_corrected`: TRL's vLLM importance-sampling correction, for a loss that does not apply it itself.
- `AdaptiveEntropy`: TRL's adaptive entropy coefficient (`use_adaptive_entropy`), on the loss's `entropy_coef`.
- `checked_loss`, `batch_stats`: the loss is a finite scalar with grad; what every micro-batch logs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence

import torch

from nanopost_trl import base


def sampler_corrected(logprobs: torch.Tensor, importance_sampling_ratio: torch.Tensor) -> torch.Tensor:
    """`logprobs` with the same values, each token's gradient multiplied by TRL's vLLM importance-sampling ratio
    ((B, T) per token, or (B, 1) per sequence; detached): TRL's `per_token_loss * importance_sampling_ratio` for a
    loss built from per-token log-probs, whatever its formula."""
    detached = logprobs.detach()
    return detached + (logprobs - detached) * importance_sampling_ratio


def loss_advantages(
    loss_fn: base.LossFn, rewards: torch.Tensor, components: torch.Tensor, names: Sequence[str], group_size: int
) -> torch.Tensor:
    """(N,) advantages from the loss's own estimator over whole groups, from the step's (N,) rewards and (N, C)
    unweighted reward components (passed by name to an `advantages` that declares `components`)."""
    grouped = rewards.view(-1, group_size)
    if "components" in inspect.signature(loss_fn.advantages).parameters:
        by_name = {name: components[:, i].view(-1, group_size) for i, name in enumerate(names)}
        return loss_fn.advantages(grouped, components=by_name).reshape(-1)
    return loss_fn.advantages(grouped).reshape(-1)


def kept_rows(loss_fn: base.LossFn, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool from the step's (N,) rewards: True where the row's group is one the loss keeps (`keep_groups`)."""
    keep = loss_fn.keep_groups(rewards.view(-1, group_size))
    keep = torch.ones(len(rewards) // group_size, dtype=torch.bool, device=rewards.device) if keep is None else keep
    return keep.bool().repeat_interleave(group_size)


@dataclasses.dataclass
class AdaptiveEntropy:
    """TRL's adaptive entropy coefficient (GRPOConfig `use_adaptive_entropy`) on a loss's `entropy_coef` field.

    A step applies the coefficient if the previous step's entropy was at or below `target` (else 0); at the step's
    end the coefficient moves by `delta` within [`minimum`, `maximum`]: up when the step's token-mean entropy over
    all processes is at or below the target, down otherwise. The coefficient and the last entropy are TRL's trainer
    attributes (`trl_bridge.entropy_state`), so TRL's checkpoints save and restore them.
    """

    minimum: float
    maximum: float
    delta: float
    target: float
    window: torch.Tensor | None = None  # (entropy sum, tokens) of the step's micro-batches so far

    @classmethod
    def from_grpo_config(cls, args) -> AdaptiveEntropy | None:
        if not args.use_adaptive_entropy:
            return None
        return cls(args.entropy_coef_min, args.entropy_coef_max, args.entropy_coef_delta, args.entropy_target)

    def applied(self, coef: float, last_entropy: float) -> float:
        """The coefficient this step's micro-batches apply."""
        return coef if last_entropy <= self.target else 0.0

    def observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a micro-batch's entropies over its loss mask to the step's window."""
        stats = torch.stack([(entropies.detach() * mask).sum(), mask.sum()]).double()
        self.window = stats if self.window is None else self.window + stats

    def step_end(self, coef: float, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        """(the next coefficient, the step's entropy) from the window summed over processes (`reduce`)."""
        total, tokens = reduce(self.window).tolist()
        self.window = None
        entropy = total / max(tokens, 1.0)
        moved = coef + self.delta if entropy <= self.target else coef - self.delta
        return min(max(moved, self.minimum), self.maximum), entropy


def truncated(completion_ids: torch.Tensor, max_new_tokens: int, end_ids: Sequence[int]) -> torch.Tensor:
    """(B,) bool: completions cut at `max_new_tokens`, by TRL's rule (`mask_truncated_completions`): full length and
    the last token no end of sequence or padding. Read from the ids alone, so it holds after TRL masked them."""
    if completion_ids.size(1) < max_new_tokens:
        return torch.zeros(completion_ids.size(0), dtype=torch.bool, device=completion_ids.device)
    last = completion_ids[:, max_new_tokens - 1]
    return ~torch.isin(last, torch.tensor(list(end_ids), device=last.device))


def checked_loss(
    loss: object, policy_logprobs: torch.Tensor, loss_name: str, step: int, skip_nonfinite: bool, needs_grad: bool
) -> tuple[torch.Tensor, bool]:
    """(the loss as a 0-dim tensor, False) if it is a finite scalar tensor, with grad where `needs_grad` (training);
    a clear error otherwise, or, with `skip_nonfinite`, (a zero loss on the same graph, True) for a NaN/inf loss."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{loss_name} must return a scalar loss tensor, got {shape} at step {step}")
    if needs_grad and not loss.requires_grad:
        raise ValueError(
            f"{loss_name} returned a loss without grad at step {step}: build it from batch.policy_logprobs"
        )
    if torch.isfinite(loss):
        return loss.reshape(()), False
    if not skip_nonfinite:
        raise FloatingPointError(
            f"{loss_name} returned a non-finite loss ({loss.item()}) at step {step}; "
            "set skip_nonfinite=True to skip such steps"
        )
    return policy_logprobs.sum() * 0.0, True


def batch_stats(batch: base.LearnerBatch) -> dict[str, float]:
    """What every run logs of a micro-batch: the policy's mean entropy and the mean |policy - rollout| log-prob gap
    (0 on-policy) over its valid tokens."""
    mask = batch.mask
    valid = mask.sum().clamp(min=1)
    gap = (batch.policy_logprobs.detach() - batch.rollout_logprobs).abs()
    stats = {"rollout_logprob_gap": ((gap * mask).sum() / valid).item()}
    if batch.entropies is not None:
        stats["entropy"] = ((batch.entropies.detach() * mask).sum() / valid).item()
    return stats
