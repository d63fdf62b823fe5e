"""Run under `accelerate launch --multi_gpu --num_processes 2`: the step-normalised losses (DAPO, CISPO, VESPO, and
DAPO with the high-entropy mask, whose quantile pools both processes' tokens) against TRL's own `_compute_loss`, each
as a loss_fn and as the built-in the adapter picks from the GRPOConfig alone.

Each process generates its own completions (different prompts and lengths: unequal token counts per process and per
micro-batch), TRL gathers the step's token count over both, and each process back-propagates two micro-batches; the
gradients are then averaged over processes as DDP does. Each process writes `{out_dir}/family-{rank}.json`: its token
count, and per case the largest relative gradient difference to TRL's.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' own helpers
from conftest import random_qwen2  # noqa: E402
from test_trl_loss_family import MAX_NEW_TOKENS, accumulated_grads, from_grpo_config, make_trainers  # noqa: E402

from nanopost_trl import learner  # noqa: E402
from nanopost_trl.assets import TINY_MODEL_PATH  # noqa: E402
from nanopost_trl.losses import CISPOLoss, DAPOLoss, VESPOLoss  # noqa: E402
from nanopost_trl.tasks import resolve_tasks  # noqa: E402
from nanopost_trl.trainer import build_dataset  # noqa: E402

CASES = {
    "dapo": ({"loss_type": "dapo", "epsilon_high": 0.28}, DAPOLoss(kl_coef=0.1)),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.3}, CISPOLoss(kl_coef=0.1, eps_high=1.3)),
    "vespo": ({"loss_type": "vespo"}, VESPOLoss(kl_coef=0.1)),
    "dapo-top-entropy": (
        {"loss_type": "dapo", "epsilon_high": 0.28, "top_entropy_quantile": 0.3},
        DAPOLoss(kl_coef=0.1, top_entropy_quantile=0.3),
    ),
}

state = PartialState(cpu=True)
out_dir, rank = Path(sys.argv[1]), state.process_index
tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH, padding_side="left")
model_dir = out_dir / "model"  # loadable by path: TRL re-loads the reference from it
if state.is_main_process:
    random_qwen2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
state.wait_for_everyone()
model = AutoModelForCausalLM.from_pretrained(model_dir)
instances = resolve_tasks("addition", "train")[:16]
dataset = build_dataset(instances)
setup = (model, tokenizer, dataset, instances, out_dir, None, None)
trl_trainer, _ = make_trainers(setup, CASES["dapo"][0], CASES["dapo"][1])
rows = [dataset[2 * rank + p] for p in range(2) for _ in range(4)]  # each process: its own 2 prompts x 4
torch.manual_seed(10 + rank)
inputs = trl_trainer._generate_and_score_completions(rows)
with torch.no_grad():
    current, _, _ = trl_trainer._get_per_token_logps_and_entropies(
        trl_trainer.model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        inputs["completion_ids"].size(1),
    )
generator = torch.Generator().manual_seed(rank)
inputs["old_per_token_logps"] = current + 0.3 * torch.randn(current.shape, generator=generator)
inputs["ref_per_token_logps"] = current + 0.3 * torch.randn(current.shape, generator=generator)
inputs["rewards"] = torch.zeros(len(rows))
inputs["advantages"] = torch.randn(len(rows), generator=generator)
inputs["truncated"] = learner.truncated(inputs["completion_ids"], MAX_NEW_TOKENS, [tokenizer.eos_token_id])


def ddp_mean(grads: dict) -> dict:
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grads


report = {"tokens": inputs["completion_mask"].sum().item(), "num_items_in_batch": inputs["num_items_in_batch"].item()}
for name, (trl_options, loss_fn) in CASES.items():
    trl_case, ours = make_trainers(setup, trl_options, loss_fn)
    expected = ddp_mean(accumulated_grads(trl_case, inputs))
    # ours with the loss_fn, and ours from the GRPOConfig alone (the built-in it picks)
    for key, trainer in ((name, ours), (f"{name}-from-config", from_grpo_config(setup, trl_options))):
        actual = ddp_mean(accumulated_grads(trainer, inputs))
        assert expected.keys() == actual.keys()
        report[key] = max(((actual[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)
(out_dir / f"family-{rank}.json").write_text(json.dumps(report))
