"""`NanopostGRPOTrainer` as a drop-in for TRL's `GRPOTrainer`: built from TRL's arguments alone, on plain TRL data
(no `instance_id`), with TRL's reward functions (extra columns, async, a reward model), its advantages options, its
evaluation loop, its metric names, and every GRPOConfig field accounted for. The gradient of each GRPOConfig loss
option against TRL's own `_compute_loss` is in `test_trl_loss_family.py`; TRL's tool semantics in `test_tools.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForSequenceClassification
from trl import GRPOConfig, GRPOTrainer

from nanopost_trl import base, trl_bridge
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import TrainConfig
from nanopost_trl.losses import DAPOLoss, GRPOLoss, MaxRLLoss

QUESTIONS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]]


def plain_dataset(conversational: bool = False) -> Dataset:
    """A TRL prompt-only dataset with an extra column (`answer`), no `instance_id`."""
    prompts = [[{"role": "user", "content": q}] if conversational else q for q in QUESTIONS]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(eval(q[8:-1])) for q in QUESTIONS]})


def trl_args(tmp_path, **options) -> GRPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
        max_steps=1, logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=0, save_strategy="no",
    )  # fmt: skip
    return GRPOConfig(**(settings | options))


def length_reward(completions, **kwargs) -> list[float]:
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def test_trl_arguments_alone_train_on_plain_data_with_trl_rewards_and_metric_names(
    tmp_path, tokenizer, random_model_dir
):
    """A TRL script's call, unchanged: conversational prompts, a reward reading an extra column, an async reward, a
    reward model with its tokenizer, reward_weights; TRL's loss metrics and our own are both logged."""
    seen_answers = []

    def answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
        seen_answers.extend(zip([prompt[-1]["content"] for prompt in prompts], answer, strict=True))
        return [float(a in c[-1]["content"]) for c, a in zip(completions, answer, strict=True)]

    async def async_length(completions, **kwargs) -> list[float]:
        return length_reward(completions)

    torch.manual_seed(0)
    reward_model = Qwen2ForSequenceClassification(
        Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    )  # fmt: skip
    trainer = NanopostGRPOTrainer(
        model=str(random_model_dir),
        reward_funcs=[answer_reward, async_length, reward_model],
        args=trl_args(tmp_path, beta=0.1, loss_type="grpo", reward_weights=[1.0, 0.1, 0.5]),
        train_dataset=plain_dataset(conversational=True),
        processing_class=tokenizer,
        reward_processing_classes=[None, None, tokenizer],
    )
    assert isinstance(trainer.loss_fn, GRPOLoss) and trainer.loss_fn.aggregation == "seq_mean"
    assert trainer.loss_fn.kl_coef == 0.1 and trainer.ref_model is not None
    trainer.train()
    logged = trainer.state.log_history[0]
    answers = dict(zip(QUESTIONS, plain_dataset()["answer"], strict=True))
    assert len(seen_answers) == 8 and all(answers[question] == answer for question, answer in seen_answers)
    trl_names = ["entropy", "kl", "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "reward_std",
                 "frac_reward_zero_std", "num_tokens", "rewards/async_length/mean"]  # fmt: skip
    for name in [*trl_names, "loss_clipfrac", "loss_kl_ref"]:
        assert name in logged, name
    assert logged["kl"] == logged["loss_kl_ref"] and logged["clip_ratio/region_mean"] == logged["loss_clipfrac"]
    assert logged["rewards/async_length/mean"] > 0


def test_trl_evaluation_loop_runs_without_grad_and_logs_eval_names(tmp_path, tokenizer, random_model_dir):
    """`eval_on_start`, `eval_steps`, `evaluate()`, and a `num_generations_eval` other than `num_generations`."""
    trainer = NanopostGRPOTrainer(
        model=str(random_model_dir),
        reward_funcs=length_reward,
        args=trl_args(
            tmp_path,
            max_steps=2,
            eval_strategy="steps",
            eval_steps=1,
            eval_on_start=True,
            num_generations_eval=2,
            per_device_eval_batch_size=4,
        ),  # fmt: skip
        train_dataset=plain_dataset(),
        eval_dataset=plain_dataset().select(range(4)),
        processing_class=tokenizer,
    )
    trainer.train()
    evaluations = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert [row["step"] for row in evaluations] == [0, 1, 2]
    assert all("eval_reward" in row and "eval_entropy" in row and "eval_loss_clipfrac" in row for row in evaluations)
    metrics = trainer.evaluate()
    assert metrics["eval_reward"] > 0 and "eval_frac_reward_zero_std" in metrics


def advantages(trainer_class, tmp_path, tokenizer, random_model_dir, **options) -> torch.Tensor:
    """The advantages of one generation batch (the same sampled completions for either trainer: ours on TRL's
    sampler, as the fast sampler draws the same distribution from another random stream)."""
    ours = {"cfg": TrainConfig(fast_sampling=False)} if trainer_class is NanopostGRPOTrainer else {}
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(random_model_dir),
        reward_funcs=[length_reward, lambda completions, **kw: [float(len(c) % 3) for c in completions]],
        args=trl_args(tmp_path, **options),
        train_dataset=plain_dataset(),
        processing_class=tokenizer,
        **ours,
    )
    trainer.model.train()
    torch.manual_seed(3)
    rows = [plain_dataset()[i] for i in range(2) for _ in range(4)]
    return trainer._generate_and_score_completions(rows)["advantages"]


@pytest.mark.parametrize(
    "options",
    [{}, {"scale_rewards": "none"}, {"scale_rewards": "batch"}, {"multi_objective_aggregation": "normalize_then_sum"},
     {"reward_weights": [0.3, 2.0]}],
    ids=["group", "none", "batch", "normalize_then_sum", "reward_weights"],
)  # fmt: skip
def test_advantage_options_give_trl_advantages(tmp_path, tokenizer, random_model_dir, options):
    expected = advantages(GRPOTrainer, tmp_path, tokenizer, random_model_dir, **options)
    actual = advantages(NanopostGRPOTrainer, tmp_path, tokenizer, random_model_dir, **options)
    torch.testing.assert_close(actual, expected)
    if options:  # the option has an effect: not the default's advantages
        assert not torch.allclose(actual, advantages(GRPOTrainer, tmp_path, tokenizer, random_model_dir))


def test_a_loss_fn_refuses_every_option_it_would_ignore_at_once(tmp_path, tokenizer, random_model_dir):
    args = trl_args(tmp_path, loss_type="grpo", epsilon=0.3, scale_rewards="none", use_adaptive_entropy=True)

    def build(loss_fn):
        return NanopostGRPOTrainer(
            model=str(random_model_dir), reward_funcs=length_reward, args=copy.deepcopy(args),
            train_dataset=plain_dataset(), processing_class=tokenizer, loss_fn=loss_fn,
        )  # fmt: skip

    with pytest.raises(ValueError, match="would ignore") as refused:
        build(MaxRLLoss())
    message = str(refused.value)
    assert "loss_type='grpo' picks TRL's loss" in message
    assert "epsilon=0.3 disagrees with MaxRLLoss.eps_low=0.2" in message
    assert "scale_rewards='none' shapes TRL's advantages, which MaxRLLoss.advantages replaces" in message
    args.loss_type, args.scale_rewards = "dapo", "group"  # agreeing values are accepted; None fields are filled
    trainer = build(DAPOLoss(eps_low=0.3, eps_high=0.3, kl_coef=None))  # epsilon_high None is epsilon, as in TRL
    assert trainer.loss_fn.kl_coef == 0.0 and trainer.ref_model is None  # beta's default: no reference loaded


def test_a_loss_fn_that_reads_the_reference_loads_it_whatever_beta_says(tmp_path, tokenizer, random_model_dir):
    trainer = NanopostGRPOTrainer(
        model=str(random_model_dir), reward_funcs=length_reward, args=trl_args(tmp_path),
        train_dataset=plain_dataset(), processing_class=tokenizer, loss_fn=GRPOLoss(kl_coef=0.05),
    )  # fmt: skip
    assert trainer.ref_model is not None and trainer.loss_fn.kl_coef == 0.05


def test_every_grpo_config_field_is_honoured_or_mapped():
    """The bridge's table names each field GRPOConfig adds to TrainingArguments (a TRL upgrade that adds one fails
    here until someone decides), and each loss option maps to a field of some built-in."""
    kinds = trl_bridge.grpo_field_kinds()
    assert set(trl_bridge.own_grpo_fields()) == set(kinds)
    built_in_fields = {f for cls, _ in trl_bridge.LOSS_TYPES.values() for f in cls.__dataclass_fields__}
    assert set(trl_bridge.LOSS_OPTIONS.values()) <= built_in_fields


def test_adaptive_entropy_follows_trl_controller(tmp_path, tokenizer, random_model_dir):
    """TRL's adaptive entropy coefficient, step by step, with the coefficient TRL logs."""
    options = dict(max_steps=3, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.004,
                   entropy_target=1e9, loss_type="grpo")  # fmt: skip
    logged = {}
    for trainer_class in (GRPOTrainer, NanopostGRPOTrainer):
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(random_model_dir), reward_funcs=length_reward,
            args=trl_args(tmp_path, **options), train_dataset=plain_dataset(), processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
        logged[trainer_class] = [row["entropy_coef"] for row in trainer.state.log_history if "entropy_coef" in row]
    assert logged[NanopostGRPOTrainer] == pytest.approx(logged[GRPOTrainer]) == [0.014, 0.018, 0.022]


def test_the_package_exports_the_drop_in_under_trl_name():
    from nanopost_trl import GRPOTrainer as Exported

    assert Exported is NanopostGRPOTrainer and issubclass(Exported, GRPOTrainer)


def test_a_loss_without_a_kl_coef_field_pays_for_no_reference(tmp_path, tokenizer, random_model_dir):
    class PlainPG(base.LossFn):
        def __call__(self, batch):
            return -(batch.advantages * batch.policy_logprobs * batch.mask).sum() / batch.mask.sum(), {}

    trainer = NanopostGRPOTrainer(
        model=str(random_model_dir), reward_funcs=length_reward, args=trl_args(tmp_path),
        train_dataset=plain_dataset(), processing_class=tokenizer, loss_fn=PlainPG(),
    )  # fmt: skip
    assert not PlainPG().uses_reference and trainer.ref_model is None
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_train_config_that_disagrees_with_trl_config_is_refused(tmp_path, tokenizer, random_model_dir):
    """Beside TRL's GRPOConfig, a TrainConfig holds the adapter's own features; its fields that GRPOConfig holds too
    would be ignored, so a disagreeing one is refused (an agreeing one, or an adapter feature, is fine)."""

    def build(cfg):
        return NanopostGRPOTrainer(
            model=str(random_model_dir), reward_funcs=length_reward, args=trl_args(tmp_path, learning_rate=1e-5),
            train_dataset=plain_dataset(), processing_class=tokenizer, cfg=cfg,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"learning_rate=3e-05 \(GRPOConfig learning_rate=1e-05\)"):
        build(TrainConfig(learning_rate=3e-5, temperature=0.7))
    assert not build(TrainConfig(learning_rate=1e-5, shared_prompt=False)).shared_prompt.applies


def test_every_completion_truncated_and_masked_trains_nothing(tmp_path, tokenizer, random_model_dir):
    """`mask_truncated_completions` with every completion cut: the loss is 0 and no weight moves (the shared-prompt
    pass, which has nothing to score, hands such a micro-batch to TRL's log-prob path; one-token prompts would leave
    it an empty sequence)."""
    trainer = NanopostGRPOTrainer(
        model=str(random_model_dir), reward_funcs=length_reward,
        train_dataset=Dataset.from_dict({"prompt": [str(digit) for digit in range(8)]}),  # one token each
        args=trl_args(
            tmp_path, mask_truncated_completions=True, learning_rate=0.1,
            generation_kwargs={"suppress_tokens": [tokenizer.eos_token_id, tokenizer.pad_token_id]},  # never ends
        ),  # fmt: skip
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.shared_prompt.applies
    before = {name: param.clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] == 0.0
    assert all(torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())
