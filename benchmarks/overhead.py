"""Adapter overhead: plain TRL `GRPOTrainer(loss_type="grpo")` vs nanopost_trl's `GRPOLoss` on the same model and data.

Both trainers step side by side in one process, interleaved (A, B, A, B, ...) after warm-up, with the same seed for
each pair of steps, so machine noise hits both alike. Prints per model: the median step-time ratio (goal <= 1.03),
forward passes per step (hooks on the policy and on the reference model, with and without grad), and the peak-RSS
ratio of the two run in separate child processes (goal <= 1.05). CPU only here; on a GPU it uses CUDA peak memory.

    python benchmarks/overhead.py [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOTrainer

from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.assets import TINY_MODEL_PATH
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.rewards import Correctness, RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset

MODELS = {
    "embedded tiny": None,  # the shipped checkpoint
    "random Qwen2 h512 L8": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8),
}


def model_dir(name: str, workdir: Path) -> Path:
    """The embedded checkpoint, or a saved random-init Qwen2 of the given shape over the embedded tokenizer."""
    shape = MODELS[name]
    if shape is None:
        return TINY_MODEL_PATH
    path = workdir / name.replace(" ", "_")
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
        torch.manual_seed(0)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            num_key_value_heads=shape["num_attention_heads"] // 2,
            max_position_embeddings=256,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            **shape,
        )
        Qwen2ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def build(kind: str, path: Path, kl_coef: float, shared_prompt: bool = False):
    """One trainer ("trl" or "nanopost") on TINY_CPU's batch shape: 8 prompts x 8 responses, 8 new tokens; the
    adapter with each prompt through the model once or not (`shared_prompt`)."""
    cfg = Preset.TINY_CPU.make(
        model=str(path), out_dir=tempfile.mkdtemp(), run_name=kind, micro_batch_size=32, shared_prompt=shared_prompt
    )
    args = to_grpo_config(cfg, num_processes=1, reward_weights=[1.0])
    args.beta, args.loss_type, args.use_bias_correction_kl = kl_coef, "grpo", False
    instances = resolve_tasks("addition", "train")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    common = dict(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=build_dataset(instances),
        processing_class=tokenizer,
    )

    def correctness(completions, instance_id, **kwargs):
        return [instances[i].eval_fn(c[-1]["content"]) for c, i in zip(completions, instance_id, strict=True)]

    if kind == "trl":
        trainer = GRPOTrainer(reward_funcs=correctness, **common)
    else:
        # the same GRPOConfig: the adapter's built-in for loss_type "grpo" (GRPOLoss, seq_mean, kl_coef = beta)
        reward = RewardAdapter(Correctness(), instances)  # the default reward, with its per-completion guard
        trainer = NanopostGRPOTrainer(reward_funcs=[reward], instances=instances, cfg=cfg, **common)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer.model.train()
    return trainer, cfg


def one_step(trainer, cfg, step: int) -> float:
    """One optimizer step as TRL's loop does it: generate + score once, then accumulate over micro-batches."""
    torch.manual_seed(step)
    dataset = trainer.train_dataset
    rows = [dataset[(step * cfg.prompts_per_step + p) % len(dataset)] for p in range(cfg.prompts_per_step)]
    batch = [row for row in rows for _ in range(cfg.responses_per_prompt)]
    start = time.perf_counter()
    for _ in range(trainer.args.gradient_accumulation_steps):  # training_step generates on its first micro-step
        trainer.training_step(trainer.model, batch, None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def count_forwards(trainer, cfg) -> Counter:
    """Forward calls during one step, by module (policy/reference) and grad mode; generation counted too."""
    counts: Counter = Counter()
    hooks = []

    def record(*_, label: str) -> None:
        counts.update([f"{label} {'grad' if torch.is_grad_enabled() else 'no-grad'}"])

    for label, module in (("policy", trainer.model), ("reference", trainer.ref_model)):
        if module is not None:
            hooks.append(module.register_forward_hook(functools.partial(record, label=label)))
    one_step(trainer, cfg, step=0)
    for hook in hooks:
        hook.remove()
    return counts


def peak_memory(kind: str, path: Path, kl_coef: float, steps: int, shared_prompt: bool) -> float:
    """Peak memory (MB) of `steps` steps of one trainer in a fresh child process: CUDA peak on GPU, else max RSS."""
    code = (
        "import json, resource, sys, torch; sys.path.insert(0, 'benchmarks'); import overhead as o; "
        f"t, c = o.build({kind!r}, o.Path({str(path)!r}), {kl_coef}, {shared_prompt}); "
        f"[o.one_step(t, c, s) for s in range({steps})]; "
        "cuda = torch.cuda.is_available(); "
        "print(json.dumps(torch.cuda.max_memory_allocated() / 2**20 if cuda else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kl_coef", type=float, default=0.0)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument(
        "--shared_prompt", action="store_true", help="the adapter with shared_prompt=True (default off)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    workdir = Path(tempfile.mkdtemp())
    for name in args.models:
        path = model_dir(name, workdir)
        (trl_trainer, cfg), (ours, _) = (
            build("trl", path, args.kl_coef),
            build("nanopost", path, args.kl_coef, args.shared_prompt),
        )
        ours.model.load_state_dict(copy.deepcopy(trl_trainer.model.state_dict()))
        forwards = {"trl": count_forwards(trl_trainer, cfg), "nanopost": count_forwards(ours, cfg)}
        times: dict[str, list[float]] = {"trl": [], "nanopost": []}
        for step in range(1, args.warmup + args.steps + 1):
            for kind, trainer in (
                (("trl", trl_trainer), ("nanopost", ours))
                if step % 2
                else (
                    ("nanopost", ours),
                    ("trl", trl_trainer),
                )
            ):
                elapsed = one_step(trainer, cfg, step)
                if step > args.warmup:
                    times[kind].append(elapsed)
        median = {kind: statistics.median(values) for kind, values in times.items()}
        memory = {
            kind: peak_memory(kind, path, args.kl_coef, steps=3, shared_prompt=args.shared_prompt)
            for kind in ("trl", "nanopost")
        }
        result = {
            "model": name,
            "kl_coef": args.kl_coef,
            "median_step_s": median,
            "time_ratio": median["nanopost"] / median["trl"],
            "peak_memory_mb": memory,
            "memory_ratio": memory["nanopost"] / memory["trl"],
            "forwards_per_step": {kind: dict(sorted(c.items())) for kind, c in forwards.items()},
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
