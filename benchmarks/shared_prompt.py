"""The learning phase with each prompt through the model once (`nanopost_trl.shared_prompt`) vs once per completion.

One micro-batch's grad-carrying log-probs and entropies (forward) and the backward of a loss over them, as the
learner runs them: TRL's fused LM head in the adapter's CPU tiles (`fused_head_tiles`), fp32, under the accelerator's
autocast. Unshared: TRL's `GRPOTrainer._get_per_token_logps_and_entropies` (`trl_bridge.trl_logprobs`) on the rows
as they are. Shared: the same rows packed by prompt. Both interleaved in one run, the median of `--rounds` rounds,
on two shapes:
- `smollm`: SmolLM2-135M-Instruct (its shipped GGUF, converted once and cached), SMOLLM_CPU's micro-batch of
  4 prompts x 8 completions, a 46-token prompt (its chat template with the system prompt) and 12-token completions;
- `prompt-heavy`: SmolLM2's config with random weights, 1 prompt x 8 completions, a 300-token prompt (a GSM8K-style
  few-shot chat prompt) and 64-token completions.

    python benchmarks/shared_prompt.py [--shapes smollm prompt-heavy] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from nanopost_trl.config import Preset
from nanopost_trl.models import resolve_model_path
from nanopost_trl.shared_prompt import shared_prompt_logprobs, shared_prompt_unsupported
from nanopost_trl.trl_bridge import fused_head_tiles, trl_logprobs

SMOLLM = "smollm2-135m-instruct"
CPU_TILES = Preset.SMOLLM_CPU.make()  # its fused-head tile width on CPU


@dataclasses.dataclass(frozen=True)
class Shape:
    pretrained: bool  # SmolLM2's weights, else random weights of its config
    prompts: int
    completions_per_prompt: int
    prompt_tokens: int
    completion_tokens: int


SHAPES = {
    "smollm": Shape(pretrained=True, prompts=4, completions_per_prompt=8, prompt_tokens=46, completion_tokens=12),
    "prompt-heavy": Shape(
        pretrained=False, prompts=1, completions_per_prompt=8, prompt_tokens=300, completion_tokens=64
    ),
}


def load_model(pretrained: bool) -> torch.nn.Module:
    path = resolve_model_path(SMOLLM)
    torch.manual_seed(0)
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return model.train()


def micro_batch(shape: Shape, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Each prompt repeated for its completions, consecutive, as TRL generates them; every token real."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(vocab_size, (shape.prompts, shape.prompt_tokens), generator=generator)
    prompt_ids = prompts.repeat_interleave(shape.completions_per_prompt, dim=0)
    completion_ids = torch.randint(vocab_size, (len(prompt_ids), shape.completion_tokens), generator=generator)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)


def logprobs(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], shared: bool, trl_self) -> torch.Tensor:
    """The completions' log-probs (entropies computed too, as the learner does) by either path."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    with fused_head_tiles(CPU_TILES.vocab_chunk(triton=False)), trl_self.accelerator.autocast():
        if shared:
            return shared_prompt_logprobs(model, *batch, compute_entropy=True)[0]
        return trl_logprobs(
            trl_self,
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
        )[0]


def learning_phase(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], shared: bool, trl_self) -> float:
    """Seconds for the grad-carrying log-probs and the backward of a loss over them."""
    start = time.perf_counter()
    logprobs(model, batch, shared, trl_self).sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def measure(name: str, rounds: int, trl_self) -> str:
    shape = SHAPES[name]
    model = load_model(shape.pretrained)
    if reason := shared_prompt_unsupported(model):
        raise SystemExit(f"the shared-prompt path does not apply: {reason}")
    batch = micro_batch(shape, model.config.vocab_size)
    with torch.no_grad():
        gap = (logprobs(model, batch, True, trl_self) - logprobs(model, batch, False, trl_self)).abs().max().item()
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_index in range(rounds + 1):  # round 0 warms up
        for shared in (False, True) if round_index % 2 else (True, False):
            seconds = learning_phase(model, batch, shared, trl_self)
            if round_index:
                times[shared].append(seconds)
    unshared, shared = (statistics.median(times[key]) for key in (False, True))
    rows = shape.prompts * shape.completions_per_prompt
    return (
        f"| {name} | {rows} x ({shape.prompt_tokens} + {shape.completion_tokens}), {shape.prompts} prompt(s) "
        f"| {unshared:.2f} s | {shared:.2f} s | {shared / unshared:.2f} | {gap:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trl_self = types.SimpleNamespace(accelerator=Accelerator(cpu=True))  # the unshared TRL method reads only this
    threads = torch.get_num_threads()
    print(f"learning phase (grad log-probs + backward), fp32, {threads} threads, median of {args.rounds} rounds")
    print("| shape | micro-batch | unshared (TRL) | shared prompt | shared / unshared | max log-prob gap |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        print(measure(name, args.rounds, trl_self), flush=True)


if __name__ == "__main__":
    main()
