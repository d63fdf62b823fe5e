"""TRL's whole `loss_type` family and its options: TRL's own `GRPOTrainer._compute_loss` against the adapter with the
matching built-in, on the same inputs, over two accumulated micro-batches of unequal token counts (fp32, rtol 1e-5).

Each case names TRL's `GRPOConfig` options and the built-in that a TRL user would pick for them (README: "TRL
`loss_type` -> nanopost built-in"). The adapter fills `entropies`, `num_items_in_batch` (TRL's
`inputs["num_items_in_batch"]`) and `micro_batches_per_step` of the `LearnerBatch` from TRL's inputs, and `truncated`
from the key its own generation step adds (set here as it would).
"""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from nanopost_trl import base, learner
from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import TrainConfig
from nanopost_trl.losses import CISPOLoss, DAPOLoss, GRPOLoss, GSPOLoss, LUSPOLoss, SAPOLoss, VESPOLoss
from nanopost_trl.rewards import RewardAdapter
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import build_dataset

MAX_NEW_TOKENS = 10
KL_COEF = 0.1
ACCUMULATION = 2  # micro-batches per optimizer step; TRL's generation batch spans them (steps_per_generation = 2)


def completion_length_reward(completions, **kwargs):
    return [len(c[-1]["content"]) / MAX_NEW_TOKENS for c in completions]


def grpo_args(tmp_path, **options) -> GRPOConfig:
    return helpers.grpo_args(
        tmp_path / "out", per_device_train_batch_size=4, gradient_accumulation_steps=ACCUMULATION,
        max_completion_length=MAX_NEW_TOKENS, beta=KL_COEF, **({"use_bias_correction_kl": False} | options),
    )  # fmt: skip


# (id, TRL's GRPOConfig options, the built-in); KL on throughout (beta = kl_coef = 0.1)
CASES = [
    ("grpo", {"loss_type": "grpo"}, GRPOLoss(kl_coef=KL_COEF)),
    ("bnpo", {"loss_type": "bnpo"}, GRPOLoss(kl_coef=KL_COEF, aggregation="token_mean")),
    (
        "dr_grpo",
        {"loss_type": "dr_grpo"},
        GRPOLoss(kl_coef=KL_COEF, aggregation="constant", max_new_tokens=MAX_NEW_TOKENS),
    ),
    (
        "grpo-asymmetric-clip",
        {"loss_type": "grpo", "epsilon": 0.15, "epsilon_high": 0.35},
        GRPOLoss(kl_coef=KL_COEF, eps_low=0.15, eps_high=0.35),
    ),
    (
        "bnpo-asymmetric-clip",
        {"loss_type": "bnpo", "epsilon": 0.3, "epsilon_high": 0.1},
        GRPOLoss(kl_coef=KL_COEF, aggregation="token_mean", eps_low=0.3, eps_high=0.1),
    ),
    ("dapo", {"loss_type": "dapo", "epsilon_high": 0.28}, DAPOLoss(kl_coef=KL_COEF)),
    (
        "dapo-kl-ratio-correction",
        {"loss_type": "dapo", "epsilon_high": 0.28, "use_bias_correction_kl": True},
        DAPOLoss(kl_coef=KL_COEF, kl_ratio_correction=True),
    ),
    (
        "gspo",
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        GSPOLoss(kl_coef=KL_COEF),
    ),
    (
        "gspo-kl-ratio-correction",
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.05, "use_bias_correction_kl": True},
        GSPOLoss(kl_coef=KL_COEF, eps_low=0.05, eps_high=0.05, kl_ratio_correction=True),
    ),
    (
        "luspo",
        {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
        LUSPOLoss(kl_coef=KL_COEF),
    ),
    ("cispo", {"loss_type": "cispo", "epsilon_high": 1.3}, CISPOLoss(kl_coef=KL_COEF, eps_high=1.3)),
    ("sapo", {"loss_type": "sapo"}, SAPOLoss(kl_coef=KL_COEF)),
    (
        "sapo-temperatures",
        {"loss_type": "sapo", "sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0},
        SAPOLoss(kl_coef=KL_COEF, tau_pos=0.5, tau_neg=2.0),
    ),
    ("vespo", {"loss_type": "vespo"}, VESPOLoss(kl_coef=KL_COEF)),
    ("grpo-delta", {"loss_type": "grpo", "delta": 1.3}, GRPOLoss(kl_coef=KL_COEF, delta=1.3)),
    (
        "dapo-off-policy-mask",
        {"loss_type": "dapo", "epsilon_high": 0.28, "off_policy_mask_threshold": 0.05},
        DAPOLoss(kl_coef=KL_COEF, off_policy_mask_threshold=0.05),
    ),
    (
        "grpo-top-entropy",
        {"loss_type": "grpo", "top_entropy_quantile": 0.2},
        GRPOLoss(kl_coef=KL_COEF, top_entropy_quantile=0.2),
    ),
    (
        "cispo-top-entropy",
        {"loss_type": "cispo", "epsilon_high": 1.3, "top_entropy_quantile": 0.5},
        CISPOLoss(kl_coef=KL_COEF, eps_high=1.3, top_entropy_quantile=0.5),
    ),
    ("grpo-entropy-bonus", {"loss_type": "grpo", "entropy_coef": 0.05}, GRPOLoss(kl_coef=KL_COEF, entropy_coef=0.05)),
    (
        "dapo-entropy-bonus-on-top-entropy",
        {"loss_type": "dapo", "epsilon_high": 0.28, "entropy_coef": 0.05, "top_entropy_quantile": 0.3},
        DAPOLoss(kl_coef=KL_COEF, entropy_coef=0.05, top_entropy_quantile=0.3),
    ),
    (
        "vespo-off-policy-mask-entropy-bonus",
        {"loss_type": "vespo", "off_policy_mask_threshold": 0.05, "entropy_coef": 0.05},
        VESPOLoss(kl_coef=KL_COEF, off_policy_mask_threshold=0.05, entropy_coef=0.05),
    ),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, random_model_dir):
    """The model, dataset and one generation batch of 2 prompts x 4 completions (with and without TRL's masking of
    truncated completions), with stale rollout log-probs so that ratios leave every clip range."""
    tmp_path = tmp_path_factory.mktemp("trl_family")
    instances = resolve_tasks("addition", "train")[:16]
    dataset = build_dataset(instances)
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    trainer = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=completion_length_reward,
        args=grpo_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    rows = [dataset[i] for i in range(2) for _ in range(4)]
    generated = {}
    for mask_truncated in (False, True):
        trainer.mask_truncated_completions = mask_truncated  # TRL applies it while building the batch
        torch.manual_seed(2)  # completions of 4 to 10 tokens: padding, ended and truncated rows
        generated[mask_truncated] = trainer._generate_and_score_completions(rows)
    plain, masked = generated[False], generated[True]
    assert torch.equal(plain["completion_ids"], masked["completion_ids"])
    lengths = plain["completion_mask"].sum(1)
    assert lengths.min() < lengths.max() == MAX_NEW_TOKENS
    assert masked["num_items_in_batch"] < plain["num_items_in_batch"]
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([plain["prompt_ids"], plain["completion_ids"]], dim=1),
            torch.cat([plain["prompt_mask"], plain["completion_mask"]], dim=1),
            plain["completion_ids"].size(1),
        )
    generator = torch.Generator().manual_seed(2)
    stale = current + 0.3 * torch.randn(current.shape, generator=generator)
    reference = current + 0.3 * torch.randn(current.shape, generator=generator)
    # the adapter's own key (TRL's rule: full length, the last token no EOS or pad), the same after TRL's masking
    end_ids = [*trainer.eos_token_ids, tokenizer.pad_token_id]
    truncated = learner.truncated(plain["completion_ids"], MAX_NEW_TOKENS, end_ids)
    assert torch.equal(truncated, learner.truncated(masked["completion_ids"], MAX_NEW_TOKENS, end_ids))
    assert torch.equal(truncated, (masked["completion_mask"].sum(1) == 0) & (plain["completion_mask"].sum(1) > 0))
    for inputs in (plain, masked):
        inputs.update(old_per_token_logps=stale, ref_per_token_logps=reference, rewards=torch.zeros(len(rows)))
        inputs["truncated"] = truncated
        inputs["advantages"] = torch.tensor([1.2, -0.8, 0.3, -0.5, -1.0, 0.9, 0.4, -0.2])
    return model, tokenizer, dataset, instances, tmp_path, plain, masked


def micro_batches(inputs: dict) -> list[dict]:
    """Two micro-batches of 3 and 5 rows (unequal token counts), as TRL's split keeps non-row entries whole."""
    rows = len(inputs["advantages"])
    parts = [slice(0, 3), slice(3, rows)]
    return [
        {k: v[part] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == rows else v for k, v in inputs.items()}
        for part in parts
    ]


def accumulated_grads(trainer: GRPOTrainer, inputs: dict) -> dict[str, torch.Tensor]:
    """Parameter gradients of one optimizer step: `_compute_loss` per micro-batch, backward, summed."""
    trainer.model.zero_grad()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ACCUMULATION
    parts = micro_batches(inputs)
    tokens = [part["completion_mask"].sum().item() for part in parts]
    assert tokens[0] != tokens[1]
    if torch.distributed.is_initialized():  # the step's count spans every process's tokens
        assert sum(tokens) < inputs["num_items_in_batch"].item()
    else:
        assert sum(tokens) == inputs["num_items_in_batch"].item()
    for part in parts:
        trainer._compute_loss(trainer.model, part).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def make_trainers(setup, trl_options: dict, loss_fn: base.LossFn) -> tuple[GRPOTrainer, NanopostGRPOTrainer]:
    model, tokenizer, dataset, instances, tmp_path, _, _ = setup
    trl_trainer = GRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=completion_length_reward,
        args=grpo_args(tmp_path, **trl_options),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    # ours with the loss_fn: GRPOConfig's loss options at TRL's defaults (the loss holds them), the reference
    # loaded because the loss reads it
    ours = NanopostGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=[RewardAdapter(lambda completions, instances: [0.0] * len(completions), instances)],
        args=helpers.grpo_args(
            tmp_path / "ours",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=ACCUMULATION,
            max_completion_length=MAX_NEW_TOKENS,
        ),  # fmt: skip
        train_dataset=dataset,
        processing_class=tokenizer,
        loss_fn=loss_fn,
        instances=instances,
        cfg=TrainConfig(),
    )
    return trl_trainer, ours


def from_grpo_config(setup, trl_options: dict) -> NanopostGRPOTrainer:
    """Ours built as a TRL user builds TRL's: TRL's arguments alone, the loss picked from the GRPOConfig."""
    model, tokenizer, dataset, _, tmp_path, _, _ = setup
    return NanopostGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=completion_length_reward,
        args=grpo_args(tmp_path, **trl_options),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def assert_grads_equal(actual: dict, expected: dict) -> None:
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("trl_options", "loss_fn"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_gradients_equal_trl(setup, trl_options, loss_fn):
    plain = setup[5]
    trl_trainer, ours = make_trainers(setup, trl_options, loss_fn)
    expected = accumulated_grads(trl_trainer, plain)
    actual = accumulated_grads(ours, plain)
    assert_grads_equal(actual, expected)


@pytest.mark.parametrize("trl_options", [case[1] for case in CASES], ids=[case[0] for case in CASES])
def test_gradients_equal_trl_from_grpo_config_alone(setup, trl_options):
    """No loss_fn: the adapter's built-in for `loss_type` and the loss options gives TRL's gradient."""
    plain = setup[5]
    trl_trainer, _ = make_trainers(setup, trl_options, GRPOLoss(kl_coef=KL_COEF))
    ours = from_grpo_config(setup, trl_options)
    assert_grads_equal(accumulated_grads(ours, plain), accumulated_grads(trl_trainer, plain))


@pytest.mark.parametrize(
    ("trl_options", "loss_fn"),
    [
        ({"loss_type": "dapo", "epsilon_high": 0.28}, DAPOLoss(kl_coef=KL_COEF, mask_truncated=True)),
        (
            {"loss_type": "grpo", "top_entropy_quantile": 0.5},
            GRPOLoss(kl_coef=KL_COEF, mask_truncated=True, top_entropy_quantile=0.5),
        ),
    ],
    ids=["dapo", "grpo-top-entropy"],
)
def test_mask_truncated_equals_trl_mask_truncated_completions(setup, trl_options, loss_fn):
    """TRL masks truncated completions while building the batch (their tokens leave `completion_mask`, hence
    `num_items_in_batch` and the entropy quantile's pool); the adapter, given the same batch, must agree."""
    masked = setup[6]
    truncated_rows = (masked["completion_mask"].sum(1) == 0) & (setup[5]["completion_mask"].sum(1) > 0)
    assert 0 < truncated_rows.sum() < len(truncated_rows)
    trl_trainer, ours = make_trainers(setup, trl_options | {"mask_truncated_completions": True}, loss_fn)
    assert_grads_equal(accumulated_grads(ours, masked), accumulated_grads(trl_trainer, masked))


def test_mask_truncated_on_unmasked_inputs_equals_trl_for_per_sequence_normalisers(setup):
    """On a batch built without TRL's masking, the loss's own `mask_truncated` (from `batch.truncated`) gives TRL's
    gradients for the normalisers that count the micro-batch's own rows ("seq_mean" here)."""
    plain, masked = setup[5], setup[6]
    loss_fn = GRPOLoss(kl_coef=KL_COEF, mask_truncated=True, eps_high=0.28)
    trl_trainer, ours = make_trainers(setup, {"loss_type": "grpo", "epsilon_high": 0.28}, loss_fn)
    assert_grads_equal(accumulated_grads(ours, plain), accumulated_grads(trl_trainer, masked))
