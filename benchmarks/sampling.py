"""Sampling without vLLM: TRL's transformers path vs nanopost_trl's fast sampler, side by side in one run.

SmolLM2-135M-Instruct (bf16 autocast where the CPU has it, as the presets run) on three shapes:
- `SMOLLM_CPU`: 16 prompts x 8 completions of `arithmetic`, 12 new tokens;
- `SMOLLM_TOOLS_CPU`: 4 prompts x 8 episodes of `multiplication` with the calculator (TRL's `qwen2_5` template, one
  tool round), 96 new tokens at temperature 0.7;
- `prompt-heavy`: 4 prompts of about 300 tokens (worked examples in the system message) x 8 completions of 64 tokens.
Per shape, two adapters that differ only in `fast_sampling` run the generation phase
(`_generate_and_score_completions`: sampling, the tool loop, rewards) on the same prompts and seed, in alternating
order round after round; the medians give seconds, sampled tokens per second (the model's own tokens) and the ratio
ours / TRL's. With `--step`, a whole SMOLLM_CPU optimizer step (generation + learning, as TRL's loop runs it) of
the adapter (fast sampling, shared-prompt learning) against plain TRL `GRPOTrainer(loss_type="grpo")`'s, interleaved
the same way. With `--continuous_batching`, one call of TRL's `use_transformers_continuous_batching` on SMOLLM_CPU's
shape is timed too (transformers' `generate_batch`).

    python benchmarks/sampling.py [--shapes S ...] [--rounds 3] [--no_warmup] [--step] [--continuous_batching]
                                  [--threads 1]
    python benchmarks/sampling.py --shapes --step   # the whole step only
    python benchmarks/sampling.py --quick    # SMOLLM_CPU's shape, one interleaved round; last line: the ratio
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from trl import GRPOTrainer

from nanopost_trl import base, chat_templates, tools
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset, TrainConfig, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import load_model_and_tokenizer, with_supported_precision
from nanopost_trl.rewards import Correctness, RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset
from nanopost_trl.trl_bridge import generate_and_score

LONG_PROMPT_EXAMPLES = 24  # worked examples in the prompt-heavy system message: about 300 tokens with the question


def prompt_heavy(instances: list[base.TaskInstance]) -> list[base.TaskInstance]:
    """`arithmetic` instances whose prompt opens with a system message of worked examples (about 300 tokens)."""
    examples = "\n".join(f"{a} + {b} = {a + b}" for a, b in zip(range(11, 99, 3), range(97, 10, -3), strict=False))
    lines = examples.splitlines()[:LONG_PROMPT_EXAMPLES]
    system = {"role": "system", "content": "You add two numbers. Worked examples:\n" + "\n".join(lines)}
    return [dataclasses.replace(instance, prompt=[system, *instance.prompt]) for instance in instances]


SHAPES: dict[str, tuple[Preset, str, dict, Callable | None]] = {
    "SMOLLM_CPU": (Preset.SMOLLM_CPU, "arithmetic", {}, None),
    "SMOLLM_TOOLS_CPU": (Preset.SMOLLM_TOOLS_CPU, "multiplication", {}, None),
    "prompt-heavy": (Preset.SMOLLM_CPU, "arithmetic", dict(prompts_per_step=4, max_new_tokens=64), prompt_heavy),
}


def build(shape: str, kind: str, **grpo_options) -> tuple[GRPOTrainer, TrainConfig]:
    """A trainer on `shape`: "ours" (fast sampling), "trl_path" (the adapter on TRL's sampling path) or "plain"
    (TRL's `GRPOTrainer(loss_type="grpo")`), built as `Trainer.run` builds it; `grpo_options` set on its GRPOConfig."""
    preset, task, overrides, transform = SHAPES[shape]
    cfg = preset.make(out_dir=tempfile.mkdtemp(), run_name=kind, fast_sampling=kind == "ours", **overrides)
    cfg = with_supported_precision(cfg)
    instances = resolve_tasks(task, "train")
    instances = transform(instances) if transform else instances
    model, tokenizer = load_model_and_tokenizer(cfg)
    run_tools, environment_factory = tools.run_tools(instances)
    chat_templates.set_up_chat_template(tokenizer, cfg.chat_template, cfg.model, uses_tools=bool(run_tools))
    args = to_grpo_config(cfg, num_processes=1, reward_weights=[1.0])
    for name, value in grpo_options.items():
        setattr(args, name, value)
    common = dict(
        model=model,
        reward_funcs=[RewardAdapter(Correctness(), instances)],
        args=args,
        train_dataset=build_dataset(instances),
        processing_class=tokenizer,
    )
    if kind == "plain":
        args.loss_type = "grpo"
        trainer = GRPOTrainer(tools=run_tools or None, **common)
    else:
        trainer = NanopostGRPOTrainer(
            tools=run_tools,
            loss_fn=GRPOLoss(),
            instances=instances,
            cfg=cfg,
            environment_factory=environment_factory,
            **common,
        )
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model.train()
    return trainer, cfg


def batch(trainer: GRPOTrainer, cfg: TrainConfig, round_index: int) -> list[dict]:
    """A generation batch: `prompts_per_step` prompts (a different slice each round), each `responses_per_prompt`
    times in a row, as TRL's sampler repeats them."""
    dataset = trainer.train_dataset
    start = round_index * cfg.prompts_per_step
    rows = [dataset[(start + p) % len(dataset)] for p in range(cfg.prompts_per_step)]
    return [row for row in rows for _ in range(cfg.responses_per_prompt)]


def generation(trainer: GRPOTrainer, cfg: TrainConfig, round_index: int) -> tuple[float, int]:
    """(seconds, sampled tokens) of one generation phase."""
    torch.manual_seed(round_index)
    start = time.perf_counter()
    output = generate_and_score(trainer, batch(trainer, cfg, round_index))
    seconds = time.perf_counter() - start
    own_tokens = output["completion_mask"] * output.get("tool_mask", 1)
    return seconds, int(own_tokens.sum())


def step(trainer: GRPOTrainer, cfg: TrainConfig, round_index: int) -> tuple[float, int]:
    """(seconds, 0) of one optimizer step as TRL's loop runs it: generation on the first micro-step, then
    `gradient_accumulation_steps` micro-batches of learning, the optimizer step."""
    torch.manual_seed(round_index)
    rows = batch(trainer, cfg, round_index)
    start = time.perf_counter()
    for _ in range(trainer.args.gradient_accumulation_steps):
        trainer.training_step(trainer.model, rows, None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start, 0


def interleaved(runs: dict[str, Callable[[int], tuple[float, int]]], rounds: int, warmup: bool) -> dict[str, list]:
    """Each run once per round, the order reversed every other round; the warm-up round (if any) not recorded."""
    results: dict[str, list] = {name: [] for name in runs}
    for round_index in range(0 if warmup else 1, rounds + 1):
        names = list(runs) if round_index % 2 else list(reversed(runs))
        for name in names:
            measured = runs[name](round_index)
            if round_index:
                results[name].append(measured)
                print(f"  round {round_index} {name}: {measured[0]:.2f} s", flush=True)
    return results


def median(measured: list[tuple[float, int]]) -> tuple[float, float]:
    """(median seconds, median tokens per second)."""
    return statistics.median(s for s, _ in measured), statistics.median(n / s for s, n in measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="none: --step only")
    parser.add_argument("--step", action="store_true", help="also the whole SMOLLM_CPU step against plain TRL's")
    parser.add_argument("--continuous_batching", action="store_true", help="also one call of TRL's CB path")
    parser.add_argument("--quick", action="store_true", help="SMOLLM_CPU's shape, one interleaved round")
    parser.add_argument("--no_warmup", action="store_true", help="record the first round too")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on oversubscribed cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, rounds, warmup = (
        (["SMOLLM_CPU"], 1, False) if args.quick else (args.shapes, args.rounds, not args.no_warmup)
    )
    rows = []
    ratio = None
    for shape in shapes:
        (ours, cfg), (trl_path, _) = build(shape, "ours"), build(shape, "trl_path")
        trl_path.model.load_state_dict(copy.deepcopy(ours.model.state_dict()))
        prompt = ours.processing_class.apply_chat_template(
            ours.train_dataset[0]["prompt"],
            tools=ours.grpo.tools or None,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        print(
            f"{shape}: {cfg.prompts_per_step} prompts ({len(prompt)} tokens the first) x {cfg.responses_per_prompt}, "
            f"{cfg.max_new_tokens} new tokens",
            flush=True,
        )
        measured = interleaved(
            {
                "TRL": lambda r, t=trl_path, c=cfg: generation(t, c, r),
                "ours": lambda r, t=ours, c=cfg: generation(t, c, r),
            },
            rounds,
            warmup,
        )
        (trl_s, trl_tps), (ours_s, ours_tps) = median(measured["TRL"]), median(measured["ours"])
        ratio = ours_s / trl_s
        rows.append(f"| {shape} sampling | {trl_s:.2f} | {ours_s:.2f} | {trl_tps:.0f} | {ours_tps:.0f} | {ratio:.3f} |")
        del ours, trl_path
    if args.step and not args.quick:
        (ours, cfg), (plain, _) = build("SMOLLM_CPU", "ours"), build("SMOLLM_CPU", "plain")
        plain.model.load_state_dict(copy.deepcopy(ours.model.state_dict()))
        print("SMOLLM_CPU whole step", flush=True)
        measured = interleaved(
            {"TRL": lambda r: step(plain, cfg, r), "ours": lambda r: step(ours, cfg, r)}, rounds, warmup
        )
        trl_s, ours_s = (statistics.median(s for s, _ in measured[name]) for name in ("TRL", "ours"))
        rows.append(f"| SMOLLM_CPU whole step (vs plain TRL) | {trl_s:.2f} | {ours_s:.2f} | | | {ours_s / trl_s:.3f} |")
    if args.continuous_batching and not args.quick:
        trainer, cfg = build("SMOLLM_CPU", "trl_path", use_transformers_continuous_batching=True)
        seconds, tokens = generation(trainer, cfg, 1)
        rows.append(
            f"| SMOLLM_CPU sampling, TRL continuous batching (1 call) | | {seconds:.2f} | | {tokens / seconds:.0f} | |"
        )
    print(f"median of {rounds} interleaved round(s), seconds and sampled tokens/s")
    print("| shape | TRL | ours | TRL tok/s | ours tok/s | ours/TRL |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.quick:
        print(f"sampling ours/TRL: {ratio:.3f}")


if __name__ == "__main__":
    main()
