"""Where a tool task starts: SmolLM2-135M-Instruct on the held-out `multiplication` questions, before any training.

Greedy accuracy on the first `--eval_size` test questions (those a training run's eval uses), in bf16 autocast as
SMOLLM_TOOLS_CPU's evals run (fp32 on a CPU without native bf16):
- without the tool: the task's prompt with its worked examples answered directly, SmolLM2's own chat template;
- without the tool or the examples: the question alone;
- with the tool (TRL's `qwen2_5` template, one tool round): accuracy and the share of episodes that make a call the
  parser reads (a training run's step-0 eval; its first step's `tools_call_frequency` is the sampled rate).

    python benchmarks/tool_baseline.py [--eval_size 64] [--max_new_tokens 96]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from nanopost_trl import chat_templates
from nanopost_trl.config import Preset
from nanopost_trl.evaluation import held_out_scores
from nanopost_trl.models import cpu_has_native_bf16, load_model_and_tokenizer
from nanopost_trl.tasks import multiplication


def main() -> None:
    preset = Preset.SMOLLM_TOOLS_CPU.make()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval_size", type=int, default=preset.eval_size)
    parser.add_argument("--max_new_tokens", type=int, default=preset.max_new_tokens)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(preset)
    pairs = multiplication.operand_pairs("test")[: args.eval_size]
    with_tool = [multiplication.make_instance(a, b) for a, b in pairs]
    without_tool = [multiplication.make_instance(a, b, with_tool=False) for a, b in pairs]
    question_only = [dataclasses.replace(i, prompt=[i.prompt[0], i.prompt[-1]]) for i in without_tool]
    name, rows = multiplication.NAME, []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
        for setting, instances in (("without the tool", without_tool), ("without the tool or examples", question_only)):
            accuracy = held_out_scores(model, tokenizer, instances, args.max_new_tokens)["accuracy"][name]
            rows.append((setting, accuracy, None))
        chat_templates.use_chat_template(tokenizer, preset.chat_template, preset.model)
        scores = held_out_scores(model, tokenizer, with_tool, args.max_new_tokens, max_tool_calling_iterations=1)
        rows.append((f"with the tool (`{preset.chat_template}` template)", scores["accuracy"][name],
                     scores["tool_calls"][name]))  # fmt: skip
    print(f"{preset.model}, {len(pairs)} held-out `{name}` questions, {args.max_new_tokens} new tokens, greedy")
    print("| setting | accuracy | tool-call rate |\n|---|---|---|")
    for setting, accuracy, calls in rows:
        print(f"| {setting} | {accuracy:.1%} | {'' if calls is None else f'{calls:.1%}'} |")


if __name__ == "__main__":
    main()
