"""Dynamic sampling (DAPO): whole extra prompt groups sampled when the loss drops some, so each process still trains
on its share of groups (`GroupRefill`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class GroupRefill:
    """DAPO's dynamic sampling: when the loss drops prompt groups (`keep_groups`), sample whole extra groups, up to
    `TrainConfig.refill_rounds` more generation batches, so each process still trains on its share of groups.

    Every decision is taken from the keeps gathered over processes, so every process generates alike; each process
    then keeps its own kept groups first, in order, and fills the rest of its share with dropped (masked) ones.
    """

    def __init__(self, group_size: int, rows_per_process: int, num_processes: int) -> None:
        self.group_size, self.num_processes = group_size, num_processes
        self.groups_per_process = rows_per_process // group_size

    def local(self, keep: torch.Tensor, rank: int) -> torch.Tensor:
        """Process `rank`'s rows of a gathered (all processes') keep."""
        return keep.view(self.num_processes, -1)[rank]

    def short(self, keeps: Iterator[torch.Tensor]) -> bool:
        """Whether some process holds fewer kept groups than its share over the rounds so far."""
        kept_groups = sum(keep.view(self.num_processes, -1).sum(dim=1) for keep in keeps) / self.group_size
        return bool((kept_groups < self.groups_per_process).any())

    def rows(self, dataset: Sequence[dict], seed: int) -> list[dict]:
        """A generation batch's worth of dataset rows for one process: random prompts, each `group_size` times."""
        generator = torch.Generator().manual_seed(seed % 2**63)
        prompts = torch.randint(len(dataset), (self.groups_per_process,), generator=generator).tolist()
        return [dataset[i] for i in prompts for _ in range(self.group_size)]

    def select(self, local_keeps: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows of the concatenated rounds to train on, which of them are kept) for this process; None = all."""
        keep = torch.cat(local_keeps)
        if len(local_keeps) == 1:
            return None, None if keep.all() else keep
        kept_groups = keep.view(-1, self.group_size)[:, 0]
        order = torch.cat([kept_groups.nonzero()[:, 0], (~kept_groups).nonzero()[:, 0]])[: self.groups_per_process]
        rows = (order[:, None] * self.group_size + torch.arange(self.group_size, device=order.device)).reshape(-1)
        return rows, keep[rows]
