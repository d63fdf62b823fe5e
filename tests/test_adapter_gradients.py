"""Gradients through the adapter: GRPOLoss equals TRL's own GRPOTrainer loss; skipped backward rows change nothing."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools

import helpers
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from nanopost_trl import base, shared_prompt, trl_bridge
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import TrainConfig
from nanopost_trl.losses import DGLoss, GRPOLoss, KondoLoss
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset

MAX_NEW_TOKENS = 6
KL_COEF = 0.1


def completion_length_reward(completions, **kwargs):
    """A reward with spread inside each group, so advantages are non-zero."""
    return [len(c[-1]["content"]) / MAX_NEW_TOKENS for c in completions]


def grpo_args(tmp_path, loss_type: str, kl_ratio_correction: bool) -> GRPOConfig:
    return helpers.grpo_args(
        tmp_path / loss_type, per_device_train_batch_size=8, max_completion_length=MAX_NEW_TOKENS, beta=KL_COEF,
        loss_type=loss_type, use_bias_correction_kl=kl_ratio_correction,
    )  # fmt: skip


def ours_args(tmp_path) -> GRPOConfig:
    """The adapter's GRPOConfig beside a LossFn: loss options at TRL's defaults (the loss holds its own)."""
    return helpers.grpo_args(tmp_path / "ours", per_device_train_batch_size=8, max_completion_length=MAX_NEW_TOKENS)


def parameter_grads(trainer: GRPOTrainer, inputs: dict) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 2  # the accumulation scaling must match too
    trainer._compute_loss(trainer.model, inputs).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kl_ratio_correction", [False, True])
@pytest.mark.parametrize(
    ("loss_type", "aggregation"), [("grpo", "seq_mean"), ("bnpo", "token_mean"), ("dr_grpo", "constant")]
)
def test_gradients_equal_trl(tmp_path, tokenizer, random_model_dir, loss_type, aggregation, kl_ratio_correction):
    instances = resolve_tasks("addition", "train")[:16]
    dataset = build_dataset(instances)
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    trl_trainer = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=completion_length_reward,
        args=grpo_args(tmp_path, loss_type, kl_ratio_correction),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours = NanopostGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
        args=ours_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        loss_fn=GRPOLoss(
            kl_coef=KL_COEF,
            aggregation=aggregation,
            max_new_tokens=MAX_NEW_TOKENS,
            kl_ratio_correction=kl_ratio_correction,
        ),
        instances=instances,
        cfg=TrainConfig(),
    )
    trl_trainer.model.train()
    ours.model.train()

    torch.manual_seed(1)
    rows = [dataset[i] for i in range(2) for _ in range(4)]  # 2 prompts x 4 generations, as TRL's sampler repeats
    inputs = trl_trainer._generate_and_score_completions(rows)
    mask = inputs["completion_mask"].bool()
    assert inputs["advantages"].abs().sum() > 0
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        noise = torch.randn(inputs["completion_ids"].shape, generator=generator)
        current, _, _ = trl_trainer._get_per_token_logps_and_entropies(
            trl_trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            inputs["completion_ids"].size(1),
        )
    inputs["old_per_token_logps"] = current + 0.5 * noise  # stale rollout: ratios far from 1, clipping active
    inputs["ref_per_token_logps"] = current + 0.3 * torch.randn(current.shape, generator=generator)
    inputs["rewards"] = torch.zeros(len(rows))
    ratio = torch.exp(current - inputs["old_per_token_logps"])[mask]
    assert ((ratio < 0.8) | (ratio > 1.2)).float().mean() > 0.2

    expected = parameter_grads(trl_trainer, inputs)
    actual = parameter_grads(ours, inputs)
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    assert ours._metrics["train"]["loss_clipfrac"][-1] > 0.05
    assert ours._metrics["train"]["loss_kl_ref"][-1] > 0


class KondoWithoutSkipping(KondoLoss):
    backward_rows = base.LossFn.backward_rows  # every row runs the grad-carrying forward and the backward


class KondoKeepingAllRows(KondoLoss):
    def backward_rows(self, batch):
        return None  # "None = all rows", from an override too


@pytest.mark.parametrize(("unit", "keep_frac"), [("token", 0.05), ("sequence", 0.25)])
def test_kondo_skips_backward_rows_with_equal_gradients(tmp_path, tokenizer, random_model_dir, unit, keep_frac):
    instances = resolve_tasks("addition", "train")[:16]
    dataset = build_dataset(instances)
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    trainers = [
        NanopostGRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
            args=ours_args(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            loss_fn=loss_cls(keep_frac=keep_frac, kl_coef=0.0, unit=unit),
            instances=instances,
            cfg=TrainConfig(shared_prompt=False),  # rows counted unpacked
        )
        for loss_cls in (KondoLoss, KondoWithoutSkipping, KondoKeepingAllRows)
    ]
    for trainer in trainers:
        trainer.model.train()
    torch.manual_seed(1)
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    inputs = trainers[0]._generate_and_score_completions(rows)
    inputs["advantages"] = torch.linspace(-1.5, 1.5, len(rows))
    rows_in_grad_forward = []
    hook = trainers[0].model.register_forward_hook(
        lambda module, args, kwargs, output: (
            rows_in_grad_forward.append(kwargs["input_ids"].shape[0]) if torch.is_grad_enabled() else None
        ),
        with_kwargs=True,
    )
    skipping = parameter_grads(trainers[0], inputs)
    hook.remove()
    full = parameter_grads(trainers[1], inputs)
    all_rows = parameter_grads(trainers[2], inputs)
    assert 0 < rows_in_grad_forward[0] < len(rows)  # only the rows with a kept token ran forward + backward
    if unit == "sequence":
        assert rows_in_grad_forward[0] == round(keep_frac * len(rows))
    assert trainers[0]._metrics["train"]["backward_rows_frac"][-1] == rows_in_grad_forward[0] / len(rows)
    assert trainers[0]._metrics["train"]["loss_backward_skipped_frac"][-1] > 0
    assert skipping.keys() == full.keys() == all_rows.keys()
    for name in full:
        torch.testing.assert_close(skipping[name], full[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(all_rows[name], full[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kl_coef", [0.0, KL_COEF])
def test_no_more_forward_passes_than_trl(tmp_path, tokenizer, random_model_dir, kl_coef):
    """Per step: the same generation, reference and policy forwards as TRL, plus the fast sampler's one prefill of
    the distinct prompts (`nanopost_trl.sampling`); no reference pass when kl_coef is 0."""
    instances = resolve_tasks("addition", "train")[:16]
    dataset = build_dataset(instances)
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    args = grpo_args(tmp_path, "grpo", False)
    args.beta = kl_coef
    trl_trainer = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours = NanopostGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
        args=ours_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        loss_fn=GRPOLoss(kl_coef=kl_coef),
        instances=instances,
        cfg=TrainConfig(),
    )
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    counts = []
    for trainer in (trl_trainer, ours):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        count: collections.Counter = collections.Counter()

        def hook(*_, label, count=count):
            count[f"{label} {'grad' if torch.is_grad_enabled() else 'no-grad'}"] += 1

        models = {"policy": trainer.model, "reference": trainer.ref_model}
        handles = [m.register_forward_hook(functools.partial(hook, label=k)) for k, m in models.items() if m]
        torch.manual_seed(3)
        inputs = trainer._generate_and_score_completions(rows)
        inputs.setdefault("rewards", torch.zeros(len(rows)))
        trainer._compute_loss(trainer.model, inputs).backward()
        for handle in handles:
            handle.remove()
        counts.append(count)
    # generation: the fast sampler's one prefill of the distinct prompts, then one forward per new token (TRL's first
    # token's forward is its prefill of every row); scoring and learning: TRL's forwards exactly
    assert counts[0] + collections.Counter({"policy no-grad": 1}) == counts[1]
    assert counts[1]["policy grad"] == 1
    assert counts[1].get("reference no-grad", 0) == (1 if kl_coef else 0)
    assert (ours.ref_model is None) == (kl_coef == 0)


def test_the_fused_head_scores_only_completion_positions_on_cpu_in_the_configured_tiles(tiny_trainer, monkeypatch):
    """TRL's fused LM head projects every position off CUDA, in 32768-wide vocabulary tiles; the adapter's learner
    projects the completion's only, in `logprob_vocab_chunk`-wide tiles (same values and gradients:
    `test_gradients_equal_trl`, `test_chunked_logprobs_equal_the_full_logits`)."""
    import trl.trainer.utils as trl_utils

    scored: list[tuple[int, int]] = []  # (positions projected, vocabulary tile width) per call of TRL's kernel
    apply = trl_utils._ChunkedLogProbFunction.apply

    def recording_apply(hidden, weight, bias, labels, temperature, vocab_chunk, *args):
        scored.append((hidden.shape[0], vocab_chunk))
        return apply(hidden, weight, bias, labels, temperature, vocab_chunk, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", recording_apply)
    trainer = tiny_trainer()
    trainer.cfg = dataclasses.replace(trainer.cfg, logprob_vocab_chunk=5)
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    completion = inputs["completion_ids"].size(1)
    scored.clear()
    ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, completion)
    trls, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, input_ids, attention_mask, completion
    )
    assert scored == [
        (inputs["completion_mask"].sum().item(), 5),
        (input_ids.size(0) * (input_ids.size(1) - 1), trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE),
    ]
    torch.testing.assert_close(ours * inputs["completion_mask"], trls * inputs["completion_mask"])


@pytest.mark.parametrize("loss_fn", [GRPOLoss(kl_coef=KL_COEF), KondoLoss(unit="token", keep_frac=0.5)])
def test_chunked_logprobs_equal_the_full_logits(tiny_trainer, loss_fn):
    """Any LossFn: log-probs, entropies and gradients through the fused head's tiles (the embedded model's 18-token
    vocabulary in tiles of 4: five tiles, the last partial; and in one tile) equal those of the full logits."""
    trainer = tiny_trainer(loss_fn=loss_fn, cfg_overrides={"fast_sampling": False})  # TRL's sampler: this seed's batch
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    mask = inputs["completion_mask"]
    assert mask.sum() < mask.numel()  # some completions ended early: padding is scored 0 on both paths
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
    generator = torch.Generator().manual_seed(1)
    inputs["ref_per_token_logps"] = -torch.rand(mask.shape, generator=generator)
    inputs["old_per_token_logps"] = -torch.rand(mask.shape, generator=generator)

    results = {}
    for chunked, vocab_chunk in ((False, None), (True, 4), (True, None)):
        trainer.cfg = dataclasses.replace(trainer.cfg, chunked_logprobs=chunked, logprob_vocab_chunk=vocab_chunk)
        with torch.no_grad():
            logprobs, entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, mask.size(1), batch_size=3, compute_entropy=True
            )
        results[chunked, vocab_chunk] = (logprobs, entropies, parameter_grads(trainer, inputs))
    full_logprobs, full_entropies, full_grads = results[False, None]
    assert len(full_grads) > 0 and (full_logprobs * (1 - mask)).abs().sum() == 0
    for logprobs, entropies, grads in (results[True, 4], results[True, None]):
        torch.testing.assert_close(logprobs, full_logprobs, rtol=1e-5, atol=1e-6)
        # the fused head's entropy is log Z - E[z] (two numbers of the logits' size): fp32 cancellation near 0
        torch.testing.assert_close(entropies * mask, full_entropies * mask, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name in full_grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-7)


def test_full_logits_refuse_multimodal_inputs(tiny_trainer):
    trainer = tiny_trainer()
    trainer.cfg = dataclasses.replace(trainer.cfg, chunked_logprobs=False)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunked_logprobs=False supports text-only dense models; got pixel_values"):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, ids, 2, pixel_values=torch.zeros(1, 3))


def test_moe_router_loss_is_added_as_trl_adds_it(tmp_path, tokenizer):
    """A tiny random Mixtral with a router auxiliary loss: the adapter's GRPO gradients, load-balancing term included,
    equal TRL's own."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5,
        output_router_logits=True, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    model = MixtralForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    instances = resolve_tasks("addition", "train")[:16]
    dataset = build_dataset(instances)
    args = grpo_args(tmp_path, "grpo", False)
    args.beta = 0.0
    trl_trainer = GRPOTrainer(
        model=copy.deepcopy(model), reward_funcs=completion_length_reward, args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    ours = NanopostGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
        args=ours_args(tmp_path), train_dataset=dataset, processing_class=tokenizer, loss_fn=GRPOLoss(kl_coef=0.0),
        instances=instances, cfg=TrainConfig(),
    )  # fmt: skip
    assert trl_trainer.aux_loss_enabled and ours.aux_loss_enabled
    trl_trainer.model.train()
    ours.model.train()
    torch.manual_seed(1)
    inputs = trl_trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    inputs["rewards"] = torch.zeros(8)
    expected = parameter_grads(trl_trainer, inputs)
    actual = parameter_grads(ours, inputs)
    router = [name for name in expected if "gate" in name and "experts" not in name]
    assert router and all(expected[name].abs().sum() > 0 for name in router)  # the router loss reaches the router
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    assert ours._metrics["train"]["aux_loss"][-1] == pytest.approx(trl_trainer._metrics["train"]["aux_loss"][-1])


@pytest.mark.parametrize(
    "loss_fn",
    [GRPOLoss(kl_coef=KL_COEF, eps_high=0.28), DGLoss(kl_coef=KL_COEF), KondoLoss(unit="token", keep_frac=0.3)],
    ids=["grpo-reference", "dg", "kondo-gated"],
)
def test_shared_prompt_path_equals_the_unshared_one_through_the_adapter(tiny_trainer, loss_fn):
    """Every log-prob pass of a step with each prompt through the model once (policy, gated rows, reference) gives
    the unshared path's log-probs, entropies and gradients; the grad-carrying forward holds one row per prompt."""
    trainer = tiny_trainer(loss_fn=loss_fn)
    assert trainer.shared_prompt.applies and trainer.shared_prompt.whole_groups
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    generator = torch.Generator().manual_seed(1)
    inputs["ref_per_token_logps"] = -torch.rand(inputs["completion_mask"].shape, generator=generator)
    inputs["old_per_token_logps"] = -torch.rand(inputs["completion_mask"].shape, generator=generator)
    rows_per_forward = []
    hook = trainer.model.register_forward_hook(
        lambda module, args, kwargs, output: rows_per_forward.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    results = {}
    for shared in (True, False):
        trainer.shared_prompt = shared_prompt.SharedPromptSetting(shared, shared)
        rows_per_forward.clear()
        input_ids, attention_mask, completion = trl_bridge.model_inputs(inputs)
        with torch.no_grad():
            logprobs, entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, completion, batch_size=4, compute_entropy=True
            )
        results[shared] = (logprobs, entropies, parameter_grads(trainer, inputs), list(rows_per_forward))
    hook.remove()
    (shared_lp, shared_ent, shared_grads, shared_rows), (lp, ent, grads, rows) = results[True], results[False]
    assert shared_rows[:2] == [1, 1] and rows[:2] == [4, 4]  # 4 completions of one prompt per chunk of 4 rows
    mask = inputs["completion_mask"]
    torch.testing.assert_close(shared_lp, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared_ent * mask, ent * mask, rtol=1e-5, atol=1e-5)
    assert shared_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], rtol=1e-5, atol=1e-7)


def test_micro_batches_hold_whole_prompt_groups(tiny_trainer):
    """With the shared prompt on, TRL's generation-batch shuffle permutes whole groups: each micro-batch of 4 rows
    (TINY_SMOKE: 2 prompts x 4 completions, micro-batches of 4) holds one prompt's 4 completions."""
    trainer = tiny_trainer()
    trainer.args.per_device_train_batch_size, trainer.args.steps_per_generation = 4, 2
    trainer.shared_prompt = shared_prompt.shared_prompt_setting(trainer.cfg, trainer.model, trainer.args)
    assert trainer.shared_prompt.whole_groups
    trainer.model.train()
    torch.manual_seed(0)
    for _ in range(3):
        trainer._buffered_inputs = None
        batch = trainer._prepare_inputs([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
        prompts = {tuple(row.tolist()) for row in batch["prompt_ids"]}
        assert len(batch["prompt_ids"]) == 4 and len(prompts) == 1
