"""Run under `accelerate launch --multi_gpu --num_processes 2`: each advantage group holds one prompt's completions.

The reward is the prompt's instance index, so a group mixing two prompts would have unequal rewards. Each process
appends the groups it saw to `{out_dir}/groups-{rank}.json`. The loss also reports its process index as a metric,
which the log must hold as the mean over processes (0.5), and a metric that only process 1 computes (its rank plus
2, i.e. 3.0): the mean over the processes that have it, never counting a missing value as 0.
"""

import dataclasses
import json
import sys
from pathlib import Path

from accelerate import PartialState

from nanopost_trl.config import Preset
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer


@dataclasses.dataclass
class GroupRecordingGRPO(GRPOLoss):
    groups: list = dataclasses.field(default_factory=list)

    def advantages(self, rewards):
        self.groups.extend(rewards.tolist())
        return super().advantages(rewards)

    def __call__(self, batch):
        loss, metrics = super().__call__(batch)
        rank = PartialState().process_index
        return loss, {**metrics, "rank": float(rank)} | ({"only_rank1": rank + 2.0} if rank == 1 else {})


out_dir = Path(sys.argv[1])
instances = resolve_tasks("addition", "train")[:64]
index = {id(instance): i for i, instance in enumerate(instances)}


def instance_index(completions, batch):
    return [float(index[id(instance)]) for instance in batch]


loss = GroupRecordingGRPO(kl_coef=0.0)
cfg = Preset.TINY_SMOKE.make(out_dir=str(out_dir), run_name="ddp", num_steps=3, prompts_per_step=4)
Trainer(cfg).run(loss_fn=loss, tasks=instances, reward_fn=instance_index, eval_tasks="addition")
(out_dir / f"groups-{PartialState().process_index}.json").write_text(json.dumps(loss.groups))
