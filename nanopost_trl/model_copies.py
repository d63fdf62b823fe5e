"""The weights a step uses besides the learner's own: the actor's copy under actor/learner staleness
(`ActorCopy`, `sync_interval > 1`) and the reference model kept on CPU between its passes (`ReferenceOffload`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class ActorCopy:
    """With `sync_interval > 1`, the actor samples with its own copy of the trainable weights, re-copied from the
    learner every `sync_interval` steps (on resume: at the first step, as checkpoints hold the learner only)."""

    def __init__(self, sync_interval: int) -> None:
        self.sync_interval = sync_interval
        self.params: list[torch.Tensor] = []
        self.synced_at = 0

    def staleness(self, step: int, learner_params: Sequence[torch.Tensor]) -> int:
        """Re-copy the learner when due; return how many learner steps the actor is behind (0 when on-policy)."""
        if self.sync_interval > 1 and (not self.params or step % self.sync_interval == 0):
            self.params = [p.detach().clone() for p in learner_params]
            self.synced_at = step
        return step - self.synced_at if self.params else 0

    @contextlib.contextmanager
    def weights(self, learner_params: Sequence[torch.Tensor]) -> Iterator[None]:
        """The block runs with the actor's weights in the model (a storage swap, no copy); the learner's after."""
        self._swap(learner_params)
        try:
            yield
        finally:
            self._swap(learner_params)

    def _swap(self, learner_params: Sequence[torch.Tensor]) -> None:
        for param, actor in zip(learner_params, self.params, strict=True):
            param.data, actor.data = actor.data, param.data


class ReferenceOffload:
    """With `enabled`, the reference model is kept on CPU and moved to the device only for its log-prob pass."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def on_device(self, model: torch.nn.Module | None, device: torch.device) -> Iterator[None]:
        moved = self.enabled and model is not None
        if moved:
            model.to(device)
        try:
            yield
        finally:
            if moved:
                model.to("cpu")
