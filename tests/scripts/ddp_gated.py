"""Run under `accelerate launch --multi_gpu --num_processes 2` with `OUT_DIR LORA_R`: a Kondo loss whose gate keeps
nothing on process 0 and its usual top-k on process 1, so process 0 skips every row's backward while process 1 runs
some (a LoRA adapter of rank LORA_R when > 0).

Each process writes its trained weights' checksums to `{out_dir}/weights-{rank}.json`: DDP keeps them equal only if
both processes took part in every gradient all-reduce.
"""

import dataclasses
import json
import sys
from pathlib import Path

from accelerate import PartialState

from nanopost_trl.config import Preset
from nanopost_trl.losses import KondoLoss
from nanopost_trl.trainer import Trainer


@dataclasses.dataclass
class KondoSkipAllOnProcess0(KondoLoss):
    def gate(self, batch):
        return super().gate(batch) * float(PartialState().process_index != 0)


out_dir = Path(sys.argv[1])
# TRL's sampler: this seed's batches hold groups with unequal rewards (the embedded model is rarely right at
# temperature 1), so process 1's kept rows carry a gradient; the fast sampler draws from another random stream
cfg = Preset.TINY_SMOKE.make(
    out_dir=str(out_dir),
    run_name="gated",
    num_steps=3,
    save_final_model=False,
    lora_r=int(sys.argv[2]),
    fast_sampling=False,
)
trainer = Trainer(cfg)
trainer.run(loss_fn=KondoSkipAllOnProcess0(keep_frac=0.5), tasks="addition")
model = trainer.grpo_trainer.model
sums = {name: param.detach().double().sum().item() for name, param in model.named_parameters()}
(out_dir / f"weights-{PartialState().process_index}.json").write_text(json.dumps(sums))
