"""The four paper-style types: LossFn, RewardFn, LearnerBatch, TaskInstance.

Everything a researcher writes is expressed in these types; the adapter in `adapter.py` translates them onto TRL.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

Metrics = dict[str, float]
Prompt = str | list[dict[str, Any]]


@dataclasses.dataclass
class LearnerBatch:
    """What a loss sees: tensors only, no raw tokens. B sequences of one micro-batch, T completion positions.

    `loss_mask[:, 1:]` lines up with the log-prob tensors (column 0 is the last prompt position), so
    `mask = batch.loss_mask[:, 1:]` selects the completion tokens that count (tool-result tokens never count).

    How the returned loss is scaled: the adapter divides it by the number of micro-batches a process accumulates into
    one optimizer step, and DDP/DeepSpeed average the gradients over processes. So a loss that is a mean over its own
    micro-batch trains on the step's mean, and a loss that divides its masked token sum by `tokens_per_micro_batch`
    trains on (sum over every token of the step) / `num_items_in_batch`: TRL's "dapo" normalisation, exactly, however
    the step is split into micro-batches and processes (`losses.ops.aggregate(..., "step_token_mean")`).

    The fields after `loss_mask` have defaults, so a batch built with the original six still works; the adapter fills
    them all. A field is None when the run does not produce it (the reference without a reference model).
    """

    policy_logprobs: torch.Tensor  # (B, T), requires grad: log pi_theta of each sampled completion token
    rollout_logprobs: torch.Tensor  # (B, T): log-probs under the policy that sampled the token (the actor; vLLM's)
    reference_logprobs: torch.Tensor | None  # (B, T) under the frozen reference; None when the loss does not use it
    advantages: torch.Tensor  # (B, 1), broadcastable over tokens
    rewards: torch.Tensor  # (B,): the weighted sum of the reward components
    loss_mask: torch.Tensor  # (B, T + 1), float 0/1
    # (B, T), same graph as policy_logprobs: each position's policy entropy at temperature 1/`temperature` (with grad,
    # for an entropy bonus; `.detach()` it to build a mask). 0 on padding.
    entropies: torch.Tensor | None = None
    # () float: valid completion tokens of the generation batch (one optimizer step's), over all processes and
    # micro-batches (TRL's `num_items_in_batch`). None only in a hand-built batch.
    num_items_in_batch: torch.Tensor | None = None
    micro_batches_per_step: int = 1  # processes x the micro-batches the generation batch is split into
    truncated: torch.Tensor | None = None  # (B,) bool: the completion hit max_new_tokens without an end-of-sequence
    reward_components: torch.Tensor | None = None  # (B, C): each reward function's unweighted score
    reward_names: tuple[str, ...] = ()  # the C component names, in column order

    @property
    def mask(self) -> torch.Tensor:
        """The (B, T) mask aligned with the log-prob tensors, i.e. `loss_mask[:, 1:]`."""
        return self.loss_mask[:, 1:]

    @property
    def tokens_per_micro_batch(self) -> torch.Tensor:
        """`num_items_in_batch / micro_batches_per_step`: divide a masked token sum by it for TRL's "dapo" scaling."""
        if self.num_items_in_batch is None:
            raise ValueError(
                "this LearnerBatch has no num_items_in_batch (the step's valid-token count): the adapter sets it; "
                "a hand-built batch must pass it to use step-level token normalisation"
            )
        return self.num_items_in_batch.clamp(min=1) / self.micro_batches_per_step


class LossFn(abc.ABC):
    """A loss: `loss, metrics = loss_fn(batch)`. Subclass it as a `@dataclass` with hyper-parameters as fields.

    What a loss author needs to know:
    - A field left at `None` whose name is also a `TrainConfig` field (e.g. `kl_coef`, `max_new_tokens`) is filled in
      from the run's config when training starts (from GRPOConfig's `beta` / `max_completion_length` when the loss
      is handed to `NanopostGRPOTrainer` directly).
    - The reference model runs only for a loss that reads it (`uses_reference`): a loss with a non-zero `kl_coef`
      field does; any other loss that reads `batch.reference_logprobs` must say so by overriding `uses_reference`.
    - `policy_logprobs` carries the gradient; `rollout_logprobs`, `reference_logprobs`, `advantages` and `rewards` are
      detached.
    - On-policy (`num_iterations=1`, `sync_interval=1`, no vLLM), `rollout_logprobs` equal the policy's, so every
      importance ratio is 1 and a clip never binds: a clipped loss looks inert until `num_iterations` or
      `sync_interval` > 1. A loss whose ratio is against `rollout_logprobs` (the sampler's log-probs under vLLM)
      corrects the sampler mismatch itself: set `corrects_sampler_mismatch = True`.
    - `headline_metrics` and `trl_metrics` are class attributes: assign them in the class body without a type
      annotation (an annotation would make them dataclass fields).
    - The loss is checked: a non-scalar or a loss without grad is an error naming the class; NaN/inf raises unless
      `TrainConfig.skip_nonfinite`.
    """

    # Metric names (as returned, without `loss_`) shown on the per-step console line; every metric is logged anyway.
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    # Metrics that are quantities TRL logs too: returned name -> TRL's name, logged under both (`kl`,
    # `clip_ratio/region_mean`, ...), so TRL's callbacks and dashboards read them. TRL's `..._min`/`..._max` names are
    # reduced over processes by min/max, the rest by mean.
    trl_metrics: ClassVar[dict[str, str]] = {}
    # Whether the loss itself corrects for the gap between the sampler's log-probs (`rollout_logprobs`: vLLM's when
    # TrainConfig.use_vllm) and the learner's, e.g. with an importance ratio against `rollout_logprobs`. False: with
    # vLLM, the adapter applies TRL's correction, weighting each token's gradient by TRL's truncated or masked
    # `importance_sampling_ratio` (learner / sampler probability at rollout; `vllm_importance_sampling_mode`).
    corrects_sampler_mismatch: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, batch: LearnerBatch) -> tuple[torch.Tensor, Metrics]:
        """Return a scalar loss (with grad) and a dict of float metrics, logged with the prefix `loss_`."""

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages from rewards grouped by prompt, (G, K) -> (G, K). Default: GRPO's group normalisation
        (r - mean) / (std + 1e-4) with the unbiased std, as TRL's `scale_rewards="group"`. A loss that keeps this
        default trains on TRL's own advantages, which also honour GRPOConfig's `scale_rewards` and
        `multi_objective_aggregation`; one that overrides it refuses those two options.

        An override may take a keyword `components: dict[str, Tensor]` (each reward function's unweighted (G, K)
        scores, by name) to normalise the components apart, as GDPO does; the adapter passes it when it is declared.
        """
        return group_normalized_advantages(rewards)

    def keep_groups(self, rewards: torch.Tensor) -> torch.Tensor | None:
        """(G,) bool from the (G, K) grouped rewards: the prompt groups to train on; None (default) = all.

        A dropped group gets no gradient (DAPO's dynamic sampling drops groups whose rewards are all equal: zero
        advantage, no signal). With `TrainConfig.refill_rounds` the step samples extra groups to refill.
        """
        return None

    def backward_rows(self, batch: LearnerBatch) -> torch.Tensor | None:
        """(B,) bool: the sequences that need a backward pass, decided from a detached batch; None (default) = all.

        A gated loss returns False for the rows it gives no gradient; the adapter then runs the grad-carrying
        forward and the backward on the other rows only (the loss still sees the whole batch, with equal values).
        """
        return None

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads `reference_logprobs`. The reference forward pass runs only if True.

        Default: whether the loss has a non-zero `kl_coef` field (None, "the run's", counts as non-zero until it is
        filled in). Override when the rule does not fit: a loss reading the reference without a `kl_coef` field.
        """
        return hasattr(self, "kl_coef") and self.kl_coef != 0


def group_normalized_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean_group(r)) / (std_group(r) + 1e-4) over the last dim (unbiased std; 0 for a group of one)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + 1e-4)


@dataclasses.dataclass(frozen=True)
class TaskInstance:
    """One prompt and its grader. `eval_fn(completion) -> score` (1.0 correct, 0.0 wrong for exact graders).

    A tool task also gives `tools` (plain functions with type hints and a docstring, as TRL's GRPOTrainer takes them)
    and/or an `environment_factory` (a class or callable making an object with `reset(**kwargs)`, public methods the
    model may call as tools, and optionally `get_reward()`, as TRL's `environment_factory`). Its completions are then
    multi-turn episodes run by TRL's tool loop, in training and in the held-out evaluation alike; `eval_fn` grades the
    final assistant message. Tools run in-process with the arguments the model wrote: treat them as untrusted.
    """

    name: str
    prompt: Prompt
    eval_fn: Callable[[str], float]
    tools: tuple[Callable[..., str], ...] = ()
    environment_factory: Callable[[], Any] | None = None

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or self.environment_factory is not None


class RewardFn(abc.ABC):
    """Scores decoded completions: `reward_fn(completions, instances) -> list[float]`, one score each.

    Of a tool task, `completions` are the final assistant texts; a `__call__` that declares a keyword `episodes=None`
    also gets each episode's messages (assistant turns with `tool_calls`, `tool` results), and one that declares
    `environments` each episode's environment instance (see `rewards.RewardAdapter`).
    """

    name: str = "reward"

    @abc.abstractmethod
    def __call__(self, completions: list[str], instances: list[TaskInstance]) -> list[float]:
        """Return one float per completion; `instances[i]` is the task instance completion i answers."""
