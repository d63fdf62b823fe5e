"""Under `accelerate launch --num_processes 2`: a tool task, each process running TRL's tool loop on its prompts, with
the tiny Llama of `test_tools.py` fitted to call the calculator on "What is 7 * 43?". argv: model dir, output dir."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' own helpers
from test_tools import calculator, tool_cfg, tool_instances  # noqa: E402

from nanopost_trl.losses import GRPOLoss  # noqa: E402
from nanopost_trl.trainer import Trainer  # noqa: E402

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
cfg = tool_cfg(model_dir, out_dir, run_name="ddp-tools", eval_size=4)
Trainer(cfg).run(loss_fn=GRPOLoss(kl_coef=0.0), tasks=tool_instances(calculator, n=8))
