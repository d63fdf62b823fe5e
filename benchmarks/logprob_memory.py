"""Chunked log-probs on a 152k vocabulary: the logits term and the learning step's time, side by side in one run.

Qwen2.5-0.5B's shape (hidden 896, vocabulary 151936; from the planner's known config, random weights, nothing
downloaded) through the adapter's own learning step (`NanopostGRPOTrainer.compute_loss` + backward, GRPO), on
micro-batches of `--prompt_tokens` + 512 completion tokens, in three settings:
- `full logits`: `chunked_logprobs=False`, the model's own forward materialises `micro x 513 x 151936` logits;
- `fused, tile 32768`: TRL's fused LM head at TRL's own tile width (what plain TRL does);
- `fused, tile 4096`: the adapter's default on CPU (`logprob_vocab_chunk`; TRL's torch fallback, which runs on CPU,
  holds ~8 tile-sized fp32 temporaries in its backward).

Memory, with the planner's accounting (`memory.measure_peak`: torch's allocator records): the logits term, on the
model's LM head alone (the same config with 0 layers and a frozen embedding: embedding, final norm, LM head), is
the step's peak minus the LM head's gradient (every path holds it) minus the peak of the same step without the head
(the hidden states' own memory), next to the planner's `memory.logits_bytes`. Time: the learning step of the full
24-layer model, at micro-batch 1, the median of interleaved rounds.

    python benchmarks/logprob_memory.py [--micro 1 4] [--precisions fp32 bf16] [--rounds 3] [--layers 24]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanopost_trl import memory
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import QWEN_0_5B, TRL_VOCAB_CHUNK, Preset, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import TINY_MODEL, resolve_model_path
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset

COMPLETION_TOKENS = 512
SETTINGS = {  # label: (chunked_logprobs, logprob_vocab_chunk)
    "full logits": (False, None),
    "fused, tile 32768": (True, 32768),
    "fused, tile 4096": (True, 4096),
}
QWEN2_5_0_5B = memory.KNOWN_ARCHITECTURES[QWEN_0_5B]


def random_model(architecture: dict, layers: int, head_only: bool) -> torch.nn.Module:
    """A random-init fp32 model of `architecture` with `layers` layers; `head_only`: untied, frozen embedding."""
    config = AutoConfig.for_model(**{**architecture, "num_hidden_layers": layers})
    if head_only:
        config.tie_word_embeddings = False  # the LM head's gradient alone, not the embedding's
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head_only:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def trainer_for(model: torch.nn.Module, micro: int, completion_tokens: int, bf16: bool) -> NanopostGRPOTrainer:
    cfg = Preset.TINY_SMOKE.make(
        out_dir=tempfile.mkdtemp(),
        run_name="logprob_memory",
        prompts_per_step=1,
        responses_per_prompt=max(2, micro),
        micro_batch_size=micro,
        max_new_tokens=completion_tokens,
        bf16=bf16,
    )
    instances = resolve_tasks("addition", "train")[:4]
    trainer = NanopostGRPOTrainer(
        model=model,
        reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
        args=to_grpo_config(cfg, num_processes=1, reward_weights=[1.0]),
        train_dataset=build_dataset(instances),
        processing_class=AutoTokenizer.from_pretrained(resolve_model_path(TINY_MODEL), padding_side="left"),
        loss_fn=GRPOLoss(),
        instances=instances,
        cfg=cfg,
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def micro_batch(micro: int, prompt_tokens: int, completion_tokens: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ones = torch.ones(micro, prompt_tokens + completion_tokens, dtype=torch.long)
    ids = torch.randint(vocab_size, ones.shape, generator=generator)
    return {
        "prompt_ids": ids[:, :prompt_tokens],
        "prompt_mask": ones[:, :prompt_tokens],
        "completion_ids": ids[:, prompt_tokens:],
        "completion_mask": ones[:, prompt_tokens:],
        "advantages": torch.randn(micro, generator=generator),
        "rewards": torch.zeros(micro),
    }


def learning_step(trainer: NanopostGRPOTrainer, inputs: dict, setting: str) -> None:
    chunked, vocab_chunk = SETTINGS[setting]
    trainer.cfg.chunked_logprobs, trainer.cfg.logprob_vocab_chunk = chunked, vocab_chunk
    with trainer.accelerator.autocast():  # what TRL's training step wraps the learner in (bf16: autocast)
        trainer.compute_loss(trainer.model, inputs).backward()
    trainer.model.zero_grad(set_to_none=True)


def hidden_states_step(trainer: NanopostGRPOTrainer, inputs: dict) -> None:
    """The head-only model's step without its head: what every setting holds besides the logits term."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    with trainer.accelerator.autocast():
        hidden = trainer.model.model(input_ids=input_ids).last_hidden_state
    hidden[:, -inputs["completion_ids"].size(1) - 1 : -1].float().sum().backward()
    trainer.model.zero_grad(set_to_none=True)


def logits_terms(
    architecture: dict, micro: int, completion_tokens: int, bf16: bool, prompt_tokens: int
) -> dict[str, tuple[int, int]]:
    """{setting: (measured, predicted logits term in bytes)} of one micro-batch on `architecture`'s LM head."""
    trainer = trainer_for(random_model(architecture, 0, head_only=True), micro, completion_tokens, bf16)
    vocab_size, hidden_size = architecture["vocab_size"], architecture["hidden_size"]
    inputs = micro_batch(micro, prompt_tokens, completion_tokens, vocab_size)
    baseline, _ = memory.measure_peak(lambda: hidden_states_step(trainer, inputs))
    terms = {}
    for setting, (chunked, vocab_chunk) in SETTINGS.items():
        learning_step(trainer, inputs, setting)  # warm-up
        peak, _ = memory.measure_peak(lambda s=setting: learning_step(trainer, inputs, s))
        path = "torch" if chunked else "materialized"
        predicted = memory.logits_bytes(
            vocab_size, micro * completion_tokens, 2 if bf16 else 4, path, vocab_chunk or TRL_VOCAB_CHUNK
        )
        terms[setting] = (peak - vocab_size * hidden_size * 4 - baseline, predicted)  # less the head's gradient
    return terms


def step_times(precision: str, prompt_tokens: int, layers: int, rounds: int) -> list[str]:
    model = random_model(QWEN2_5_0_5B, layers, head_only=False)
    trainer = trainer_for(model, 1, COMPLETION_TOKENS, bf16=precision == "bf16")
    inputs = micro_batch(1, prompt_tokens, COMPLETION_TOKENS, model.config.vocab_size)
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    for round_index in range(rounds + 1):  # round 0 warms up
        for setting in list(SETTINGS) if round_index % 2 else list(reversed(SETTINGS)):
            start = time.perf_counter()
            learning_step(trainer, inputs, setting)
            if round_index:
                times[setting].append(time.perf_counter() - start)
    median = {setting: statistics.median(values) for setting, values in times.items()}
    return [
        f"| {precision} | {layers} | 1 x ({prompt_tokens} + {COMPLETION_TOKENS}) | {setting} | {seconds:.2f} s "
        f"| {seconds / median['full logits']:.3f} |"
        for setting, seconds in median.items()
    ]


def memory_rows(precision: str, micro: int, prompt_tokens: int) -> list[str]:
    terms = logits_terms(QWEN2_5_0_5B, micro, COMPLETION_TOKENS, precision == "bf16", prompt_tokens)
    full = terms["full logits"][0]
    return [
        f"| {precision} | {micro} x {COMPLETION_TOKENS} | {setting} | {measured / 2**20:.0f} MiB "
        f"| {predicted / 2**20:.0f} MiB | {predicted / measured:.2f} | {full / measured:.1f}x |"
        for setting, (measured, predicted) in terms.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=24, help="Layers of the timed model (Qwen2.5-0.5B: 24).")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        "| precision | positions | log-prob path | measured logits term | planner | planner / measured "
        "| full / this |\n|---|---|---|---|---|---|---|",
        flush=True,
    )
    for precision in args.precisions:
        for micro in args.micro:
            print("\n".join(memory_rows(precision, micro, args.prompt_tokens)), flush=True)
    print(f"\nlearning step (forward + backward), median of {args.rounds} interleaved rounds")
    print("| precision | layers | micro-batch | log-prob path | step | / full logits |\n|---|---|---|---|---|---|")
    for precision in args.precisions:
        print("\n".join(step_times(precision, args.prompt_tokens, args.layers, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
