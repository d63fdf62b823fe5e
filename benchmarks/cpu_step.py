"""A real model's step on CPU, by phase, every variant interleaved in one run on the same batch.

Precisions: `fp32`; `bf16` (the `bf16=True` default: fp32 master weights, bf16 autocast for sampling and learning);
`bf16_weights` (`bf16_weights=True`: the weights themselves in bf16). Each precision runs in a process of its own
(accelerate's mixed-precision setting is per process), with a trainer on SMOLLM_CPU's shape (16 prompts x 8
completions of the `arithmetic` task, 12 new tokens, micro-batches of 32), and, round after round in alternating
order:
- `generation`: TRL's generation phase (`trl_bridge.generate_and_score`) on the same prompts and seed (sampling,
  rewards, advantages);
- `adapter`: nanopost_trl's learning phase, `NanopostGRPOTrainer.compute_loss` (TRL's, calling the adapter's
  `_compute_loss`) + backward per micro-batch (GRPO), each prompt through the model once (`shared_prompt=True`, the
  default);
- `unshared`: the same with `shared_prompt=False` (each completion carries its own copy of the prompt);
- `trl`: plain `GRPOTrainer(loss_type="grpo")`'s `compute_loss` + backward on the same micro-batches (its fused LM
  head scores every position, prompt included, off CUDA);
- `floor`: the bare forward + backward: `model(..., logits_to_keep=T + 1)`, log-softmax of the completion tokens,
  the masked mean, backward.
Prints the median seconds of each and the ratios adapter / unshared, adapter / trl, unshared / trl, adapter / floor.

    python benchmarks/cpu_step.py [--rounds 3] [--model smollm2-135m-instruct] [--precisions fp32 bf16 bf16_weights]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.models import load_model_and_tokenizer, resolve_model_path
from nanopost_trl.rewards import Correctness, RewardAdapter
from nanopost_trl.shared_prompt import SharedPromptSetting
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset
from nanopost_trl.trl_bridge import generate_and_score

PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "bf16_weights": {"bf16": True, "bf16_weights": True}}


def build(kind: str, path: str, precision: str):
    cfg = Preset.SMOLLM_CPU.make(model=path, out_dir=tempfile.mkdtemp(), run_name=kind, **PRECISIONS[precision])
    args = to_grpo_config(cfg, num_processes=1, reward_weights=[1.0])
    args.loss_type = "grpo"
    instances = resolve_tasks("arithmetic", "train")
    common = dict(
        model=load_model_and_tokenizer(cfg)[0],
        reward_funcs=[RewardAdapter(Correctness(), instances)],
        args=args,
        train_dataset=build_dataset(instances),
        processing_class=AutoTokenizer.from_pretrained(path, padding_side="left"),
    )
    # ours: the same GRPOConfig, the built-in for loss_type "grpo"
    trainer = GRPOTrainer(**common) if kind == "trl" else NanopostGRPOTrainer(instances=instances, cfg=cfg, **common)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model.train()
    return trainer, cfg


def floor(model, micro_batch: dict) -> None:
    """The least a learner must do: the completion tokens' log-probs, a masked mean, backward."""
    input_ids = torch.cat([micro_batch["prompt_ids"], micro_batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([micro_batch["prompt_mask"], micro_batch["completion_mask"]], dim=1)
    completion = micro_batch["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion + 1).logits[:, :-1]
    logprobs = logits.float().log_softmax(-1).gather(-1, micro_batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = micro_batch["completion_mask"]
    (-(logprobs * mask).sum() / mask.sum()).backward()


def prompts(trainer, cfg) -> list[dict]:
    rows = [trainer.train_dataset[i] for i in range(cfg.prompts_per_step)]
    return [row for row in rows for _ in range(cfg.responses_per_prompt)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    if len(args.precisions) > 1:  # one process per precision
        for precision in args.precisions:
            command = [sys.executable, __file__, "--rounds", str(args.rounds), "--model", args.model, "--precisions"]
            subprocess.run([*command, precision], check=True)
        return
    trainers = {precision: build("adapter", path, precision) for precision in args.precisions}
    trl_trainers = {precision: build("trl", path, precision)[0] for precision in args.precisions}
    torch.manual_seed(0)
    ours, cfg = trainers["fp32"] if "fp32" in trainers else next(iter(trainers.values()))
    micro_batches = split_tensor_dict(
        generate_and_score(ours, prompts(ours, cfg)), ours.args.gradient_accumulation_steps
    )

    def generation(precision: str) -> None:
        trainer, cfg = trainers[precision]
        torch.manual_seed(0)
        generate_and_score(trainer, prompts(trainer, cfg))

    def learning(kind: str, precision: str) -> None:
        trainer, trl_trainer = trainers[precision][0], trl_trainers[precision]
        shared = trainer.shared_prompt
        trainer.shared_prompt = shared if kind == "adapter" else SharedPromptSetting(False, False)
        with trainer.accelerator.autocast():  # what TRL's training step wraps the learner in (bf16: autocast)
            for micro_batch in micro_batches:
                if kind in ("adapter", "unshared"):
                    trainer.compute_loss(trainer.model, micro_batch).backward()
                elif kind == "trl":
                    trl_trainer.compute_loss(trl_trainer.model, micro_batch).backward()
                else:
                    floor(trainer.model, micro_batch)
        trainer.shared_prompt = shared
        trainer.model.zero_grad()
        trl_trainer.model.zero_grad()

    phases = {(precision, "generation"): lambda p=precision: generation(p) for precision in args.precisions}
    for precision in args.precisions:
        for kind in ("adapter", "unshared", "trl", "floor"):
            phases[(precision, kind)] = lambda p=precision, k=kind: learning(k, p)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in phases}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for key in list(phases) if round_index % 2 else list(reversed(phases)):
            start = time.perf_counter()
            phases[key]()
            if round_index:
                times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    first = micro_batches[0]
    shape = (
        f"micro-batches of prompt {tuple(first['prompt_ids'].shape)} + completion "
        f"{tuple(first['completion_ids'].shape)}, {len(micro_batches)} a step"
    )
    print(f"{args.model}: {shape}; median of {args.rounds} interleaved rounds, seconds")
    print(
        "| precision | generation | adapter learning (shared prompt) | unshared | TRL learning | floor | "
        "adapter/unshared | adapter/TRL | unshared/TRL | adapter/floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        g, a, u, t, f = (median[(precision, kind)] for kind in ("generation", "adapter", "unshared", "trl", "floor"))
        print(
            f"| {precision} | {g:.2f} | {a:.2f} | {u:.2f} | {t:.2f} | {f:.2f} | {a / u:.3f} | {a / t:.3f} | "
            f"{u / t:.3f} | {a / f:.3f} |"
        )
    print(json.dumps({" ".join(key): [round(v, 3) for v in values] for key, values in times.items()}))


if __name__ == "__main__":
    main()
