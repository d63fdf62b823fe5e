"""A new loss is one file: the README's SimplePG, vanilla advantage-weighted policy gradient plus a k3 KL penalty.

Run it: `python examples/simple_pg.py` (trains on the tiny CPU preset), or from your own code:
`Trainer(cfg).run(loss_fn=SimplePG(), tasks="addition")`.
"""

import dataclasses

import torch

from nanopost_trl import base


@dataclasses.dataclass
class SimplePG(base.LossFn):
    """Vanilla policy gradient with advantage weighting."""

    kl_coef: float = 0.04

    def __call__(self, batch: base.LearnerBatch) -> tuple[torch.Tensor, base.Metrics]:
        mask = batch.loss_mask[:, 1:]
        pg = -batch.policy_logprobs * batch.advantages
        kl = (
            torch.exp(batch.reference_logprobs - batch.policy_logprobs)
            - (batch.reference_logprobs - batch.policy_logprobs)
            - 1
        )
        total = pg + self.kl_coef * kl
        loss = ((total * mask).sum(dim=1) / mask.sum(dim=1)).mean()
        return loss, {"kl": (kl * mask).sum().item() / mask.sum().item()}


if __name__ == "__main__":
    from nanopost_trl.config import Preset
    from nanopost_trl.trainer import Trainer

    Trainer(Preset.TINY_CPU.make()).run(loss_fn=SimplePG(), tasks="addition")
