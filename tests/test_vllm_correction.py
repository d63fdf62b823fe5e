"""vLLM's sampler/learner mismatch through TRL's own code path, with a stand-in for vLLM's generation (vLLM needs a
GPU): `rollout_logprobs` are the sampler's, and a loss that does not correct for the mismatch itself gets TRL's
importance-sampling correction, with gradients equal to TRL's own GRPO loss under the same correction."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from trl import GRPOTrainer

from nanopost_trl import base
from nanopost_trl.losses import GRPOLoss

COMPLETIONS = ["12", "345", "6", "7890"]  # one group's 4 completions: different lengths, so non-zero advantages


class StandInVLLM:
    """Replaces TRL's `VLLMGeneration`: fixed completions whose per-token log-probs are the learner's plus known
    offsets (vLLM's numerics differ from the learner's), one unscored (None, as vLLM returns for NaN), in vLLM's
    per-token top-k list layout. `returned` keeps each row's log-probs."""

    def __init__(self, trainer, tokenizer) -> None:
        self.trainer = trainer
        self.completion_ids = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in COMPLETIONS]
        self.offsets = 0.4 * torch.randn(len(COMPLETIONS), 8, generator=torch.Generator().manual_seed(0))
        self.returned: list[list[float | None]] = []

    def sync_weights(self) -> None:
        pass

    def generate(self, prompts, images, num_generations, profiler):
        completions = [self.completion_ids[i % len(COMPLETIONS)] for i in range(len(prompts))]
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                learner, _, _ = self.trainer._get_per_token_logps_and_entropies(
                    self.trainer.model, ids, torch.ones_like(ids), len(completion)
                )
            offsets = self.offsets[row % len(COMPLETIONS), : len(completion)]
            self.returned.append((learner[0] + offsets).tolist())
        self.returned[1][0] = None
        return None, completions, [[[logprob] for logprob in row] for row in self.returned], None


@dataclasses.dataclass
class LearnerRatioGRPO(base.LossFn):
    """TRL's GRPO surrogate: ratio against the learner's own log-probs, so it leaves the sampler mismatch to TRL."""

    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, batch):
        self.seen.append(batch.rollout_logprobs.clone())
        learner_batch = dataclasses.replace(batch, rollout_logprobs=batch.policy_logprobs.detach())
        return GRPOLoss(kl_coef=0.0)(learner_batch)


def vllm_inputs(trainer, tokenizer) -> tuple[dict, StandInVLLM]:
    """One generation batch through TRL's `_generate_and_score_completions` with vLLM on (the stand-in)."""
    stand_in = StandInVLLM(trainer, tokenizer)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, stand_in, -1
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(len(COMPLETIONS))]
    return trainer._generate_and_score_completions(rows), stand_in


def grads(trainer, inputs, compute_loss) -> dict[str, torch.Tensor]:
    trainer.model.zero_grad()
    compute_loss(trainer, trainer.model, inputs).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask", "token_mask"])
def test_a_loss_that_leaves_the_mismatch_to_trl_gets_trls_correction_and_the_samplers_logprobs(
    tiny_trainer, tokenizer, mode
):
    loss_fn = LearnerRatioGRPO()
    trainer = tiny_trainer(
        loss_fn=loss_fn, loss_type="grpo", vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5
    )
    inputs, stand_in = vllm_inputs(trainer, tokenizer)
    ratio = inputs["importance_sampling_ratio"]
    assert ratio.std() > 0.05  # TRL's own ratios, not all equal: the correction matters

    ours = grads(trainer, inputs, type(trainer)._compute_loss)
    trl_grpo = grads(trainer, inputs, GRPOTrainer._compute_loss)  # TRL's loss, multiplied by the same ratio
    without = dict(inputs, importance_sampling_ratio=torch.ones_like(ratio))
    uncorrected = grads(trainer, without, GRPOTrainer._compute_loss)
    for name in trl_grpo:
        torch.testing.assert_close(ours[name], trl_grpo[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(trl_grpo[name], uncorrected[name]) for name in trl_grpo)

    rollout, mask = loss_fn.seen[0], inputs["completion_mask"].bool()
    for row in range(len(rollout)):  # the sampler's known log-probs; the unscored token keeps the learner's
        known = stand_in.returned[row]
        for t, logprob in enumerate(known):
            expected = inputs["old_per_token_logps"][row, t].item() if logprob is None else logprob
            assert rollout[row, t].item() == pytest.approx(expected, abs=1e-6)
        assert mask[row].sum() == len(known)
    assert not any(math.isnan(x) for x in rollout[mask].tolist())


def test_a_loss_that_corrects_the_mismatch_itself_is_not_reweighted(tiny_trainer, tokenizer):
    trainer = tiny_trainer(loss_fn=GRPOLoss(kl_coef=0.0), vllm_importance_sampling_mode="token_truncate")
    assert GRPOLoss.corrects_sampler_mismatch  # its ratio is against the sampler's log-probs: the clip bounds it
    inputs, _ = vllm_inputs(trainer, tokenizer)
    assert inputs["importance_sampling_ratio"].std() > 0.05
    with_ratio = grads(trainer, inputs, type(trainer)._compute_loss)
    without_ratio = grads(
        trainer, {k: v for k, v in inputs.items() if k != "importance_sampling_ratio"}, type(trainer)._compute_loss
    )
    for name in with_ratio:
        torch.testing.assert_close(with_ratio[name], without_ratio[name])
