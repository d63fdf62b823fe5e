"""GPU presets measured: peak memory, generation tokens/s and learning time per step of each model-sized preset.

Hub-free: each preset's model is built from its exact public architecture (`ARCHITECTURES`), randomly initialised
(bf16 on a GPU), with an offline word-level tokenizer of the same vocabulary size, and trained for `--steps` real
steps of `Trainer.run` at the preset's batch sizes and max_new_tokens, on synthetic chat prompts of ~150 tokens. A
random model rarely samples EOS, so completions run to max_new_tokens: the worst case for memory. Presets written for
8 GPUs run their per-process batch on one. Several presets run one child process each, so each peak is its own.
Prints a markdown table (appended to `--out`); a preset above 90% of its target GPU's memory is flagged.

    python benchmarks/gpu_presets.py [--presets QWEN_1_5B_1xA100 ...] [--steps 3] [--out benchmarks/GPU_PRESETS.md]
    python benchmarks/gpu_presets.py --shrink   # CPU check of the whole path: 2-layer, hidden-64 versions, RSS
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_SPLIT,  # a space + letters: one piece
)

from nanopost_trl.base import TaskInstance
from nanopost_trl.config import Preset
from nanopost_trl.memory import KNOWN_ARCHITECTURES
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows

ARCHITECTURES = KNOWN_ARCHITECTURES  # each model's exact public shapes (nanopost_trl/memory.py)
SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096)
GPU_PRESETS = [preset.name for preset in Preset if preset.value.config["model"] in ARCHITECTURES]
MAX_TARGET_FRACTION = 0.9
SPECIAL_TOKENS = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]  # pad 0, eos 1, bos 2: Gemma's ids too
ROLE_WORDS = ["system", "user", "assistant"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
PROMPT_WORDS = 150
TARGET_WORD = "aa"
EVAL_SIZE = 2
SPACE = "\u0120"  # a space in byte-level BPE ("Ġ")


def architecture(model_id: str, shrink: bool = False) -> PretrainedConfig:
    """The transformers config of `model_id`'s architecture; `shrink`: the same family at 2 layers, hidden 64."""
    arch = dict(ARCHITECTURES[model_id])
    if shrink:
        arch.update(SHRINK)
        if "head_dim" in arch:
            arch["head_dim"] = SHRINK["hidden_size"] // SHRINK["num_attention_heads"]
    return AutoConfig.for_model(**arch)


def synthetic_words() -> list[str]:
    """The words of the synthetic prompts: every two-letter lowercase word, one token each after a space."""
    return [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens with a chat template, built as Qwen2's is.

    transformers >= 5 reloads a saved tokenizer of a `qwen2` model as its own `Qwen2Tokenizer` whatever the saved
    class: a byte-level BPE rebuilt from the saved vocab and merges, with Qwen2's pre-tokenizer (a word-level
    tokenizer came back as an unmerged BPE that turned a 150-word prompt into 3 tokens). So this tokenizer is one:
    the 256 byte symbols, merges that make each role name and `synthetic_words()` word after a space one token, and
    fillers up to `vocab_size` (letter strings no merge reaches); it tokenizes the same as itself and as Qwen2Tokenizer.
    """
    letters = string.ascii_lowercase
    merges = list(
        dict.fromkeys((SPACE + word[:i], word[i]) for word in ROLE_WORDS + synthetic_words() for i in range(len(word)))
    )
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + pre_tokenizers.ByteLevel.alphabet())}
    for token in (left + right for left, right in merges):
        vocab.setdefault(token, len(vocab))
    fillers = ("".join(chars) for size in itertools.count(3) for chars in itertools.product(letters, repeat=size))
    while len(vocab) < vocab_size:
        vocab.setdefault(next(fillers), len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )


def model_dir(model_id: str, shrink: bool, workdir: Path) -> Path:
    """A saved random-init model of `model_id`'s architecture (bf16 on a GPU) and its tokenizer; built once."""
    path = workdir / (model_id.replace("/", "--") + ("-shrink" if shrink else ""))
    if path.exists():
        return path
    config = architecture(model_id, shrink)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = path.with_name(path.name + ".partial")  # renamed when complete: a crash never leaves a half model
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    return path


def token_fraction(completion: str, token: str) -> float:
    """The fraction of the completion's words equal to `token`: a cheap reward with some spread."""
    words = completion.split()
    return words.count(token) / len(words) if words else 0.0


def synthetic_tasks(count: int, seed: int = 0) -> list[TaskInstance]:
    """`count` chat prompts of PROMPT_WORDS random words each, rewarded by the fraction of TARGET_WORD."""
    rng = random.Random(seed)
    words = synthetic_words()
    reward = functools.partial(token_fraction, token=TARGET_WORD)
    return [
        TaskInstance(
            name="synthetic",
            prompt=[{"role": "user", "content": " ".join(rng.choices(words, k=PROMPT_WORDS))}],
            eval_fn=reward,
        )
        for _ in range(count)
    ]


def measure(name: str, shrink: bool, steps: int, workdir: Path) -> dict[str, Any]:
    """`steps` steps of preset `name` through `Trainer.run`; its peak memory and per-step generation/learning speed.

    Speeds are averaged over the steps after the first (warm-up), unless there is only one.
    """
    preset = Preset.from_name(name)
    gpus, target_gib, _ = preset.value.target or (1, None, 0)  # (number of GPUs, GiB each, ZeRO stage)
    cuda = torch.cuda.is_available()
    path = model_dir(preset.value.config["model"], shrink, workdir)
    cfg = preset.make(
        model=str(path),
        num_steps=steps,
        prompts_per_step=preset.value.config["prompts_per_step"] // gpus,  # one process's share of the batch
        bf16=cuda,
        eval_size=EVAL_SIZE,
        save_final_model=False,
        out_dir=str(workdir / "runs"),
        run_name=preset.name.lower() + ("-shrink" if shrink else ""),
    )
    tasks = synthetic_tasks(count=cfg.prompts_per_step * steps)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summary = Trainer(cfg).run(tasks=tasks)
    if cuda:
        peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        peak, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None  # ru_maxrss is in KiB
        device = "CPU"
    rows = [row for row in read_rows(summary.log_path) if "learning_time_s" in row]
    timed = rows[1:] or rows
    tokens = sum(row["response_len_mean"] for row in timed) * cfg.completions_per_step
    return {
        "preset": preset.name,
        "device": device,
        "model": preset.value.config["model"] + (" (shrunk)" if shrink else ""),
        "gpus": gpus,
        "prompts_per_step": cfg.prompts_per_step,
        "responses_per_prompt": cfg.responses_per_prompt,
        "micro_batch_size": cfg.micro_batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "peak_gib": peak,
        "reserved_gib": reserved,
        "target_gib": target_gib if cuda and not shrink else None,
        "generation_tokens_per_s": tokens / sum(row["generation_time_s"] for row in timed),
        "learning_s_per_step": sum(row["learning_time_s"] for row in timed) / len(timed),
        "steps": len(rows),
    }


def measure_in_child(name: str, shrink: bool, steps: int, workdir: Path) -> dict[str, Any]:
    """`measure` in a fresh process, so its peak memory is its own."""
    result = workdir / f"{name}.json"
    command = [sys.executable, __file__, "--presets", name, "--steps", str(steps), "--workdir", str(workdir)]
    subprocess.run([*command, "--json", str(result), *(["--shrink"] if shrink else [])], check=True)
    return json.loads(result.read_text())[0]


HEADER = (
    "| preset | device | model | prompts x responses / micro (per GPU) | max_new_tokens | peak memory | of target "
    "| generation tok/s | learning s/step | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(r: dict[str, Any]) -> str:
    """One markdown row of a `measure` result."""
    if r["reserved_gib"] is None:
        memory, share = f"{r['peak_gib']:.2f} GiB RSS", "-"
    else:
        memory = f"{r['peak_gib']:.1f} GiB (reserved {r['reserved_gib']:.1f})"
        share = "-" if r["target_gib"] is None else f"{r['peak_gib'] / r['target_gib']:.0%} of {r['target_gib']} GiB"
    notes = []
    if r["target_gib"] is not None and r["peak_gib"] > MAX_TARGET_FRACTION * r["target_gib"]:
        notes.append(f"**over {MAX_TARGET_FRACTION:.0%}: fix batch sizes**")
    if r["gpus"] > 1:
        notes.append(f"1 of {r['gpus']} processes")
    batch = f"{r['prompts_per_step']} x {r['responses_per_prompt']} / {r['micro_batch_size']}"
    return (
        f"| {r['preset']} | {r['device']} | {r['model']} | {batch} | {r['max_new_tokens']} | {memory} | {share} "
        f"| {r['generation_tokens_per_s']:.0f} | {r['learning_s_per_step']:.2f} | {'; '.join(notes)} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=GPU_PRESETS, choices=GPU_PRESETS, metavar="PRESET")
    parser.add_argument("--steps", type=int, default=3, help="Training steps per preset (the first is warm-up).")
    parser.add_argument("--shrink", action="store_true", help="2-layer, hidden-64, vocab-4096 models (CPU check).")
    parser.add_argument("--out", type=Path, help="Markdown file to append the table to.")
    parser.add_argument("--json", type=Path, help="Also write the results as a JSON list.")
    parser.add_argument("--workdir", type=Path, help="Where models and run logs go (default: a temporary dir).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if len(args.presets) == 1:
            results = [measure(args.presets[0], args.shrink, args.steps, workdir)]
        else:
            results = [measure_in_child(name, args.shrink, args.steps, workdir) for name in args.presets]
    table = "\n".join([HEADER, *map(table_row, results)])
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.out:
        setup = f"torch {torch.__version__}, {args.steps} steps{', shrunk models' if args.shrink else ''}"
        with open(args.out, "a") as f:
            f.write(f"\n### GPU presets, {time.strftime('%Y-%m-%d %H:%M')} ({setup})\n\n{table}\n")


if __name__ == "__main__":
    main()
