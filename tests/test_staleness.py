"""Actor/learner staleness: with sync_interval=3 the actor samples with weights re-copied every 3 learner steps."""

from __future__ import annotations

import json

import torch

from nanopost_trl.adapter import NanopostGRPOTrainer
from nanopost_trl.config import Preset
from nanopost_trl.losses import GRPOLoss
from nanopost_trl.trainer import Trainer


class Snapshots:
    """Wraps the trainer's generation step to record actor vs learner weights and the rollout/policy gap."""

    def __init__(self):
        self.rows = []

    def install(self, monkeypatch):
        original = NanopostGRPOTrainer._generate_and_score_completions
        rows = self.rows

        def recording(trainer, inputs):
            output = original(trainer, inputs)
            learner = [p.detach() for p in trainer._trainable_params()]
            same = all(torch.equal(a, b) for a, b in zip(learner, trainer.actor.params, strict=True))
            rows.append(
                {
                    "step": trainer.state.global_step,
                    "actor_equals_learner": same,
                    "has_rollout_logprobs": "old_per_token_logps" in output,
                }
            )
            return output

        monkeypatch.setattr(NanopostGRPOTrainer, "_generate_and_score_completions", recording)


def spread_reward(completions, instances):
    """Distinct completions get distinct-ish rewards, so every step has non-zero advantages and moves the learner."""
    return [float(sum(map(ord, completion)) % 5) for completion in completions]


def test_sync_interval_three(tmp_path, monkeypatch):
    snapshots = Snapshots()
    snapshots.install(monkeypatch)
    cfg = Preset.TINY_SMOKE.make(
        out_dir=str(tmp_path), run_name="stale", num_steps=7, sync_interval=3, learning_rate=1e-3
    )
    summary = Trainer(cfg).run(loss_fn=GRPOLoss(kl_coef=0.0), tasks="addition", reward_fn=spread_reward)
    assert [r["step"] for r in snapshots.rows] == list(range(7))
    fresh = [r["step"] % 3 == 0 for r in snapshots.rows]
    assert [r["actor_equals_learner"] for r in snapshots.rows] == fresh
    assert [r["has_rollout_logprobs"] for r in snapshots.rows] == [not f for f in fresh]

    rows = [json.loads(line) for line in summary.log_path.read_text().splitlines()][1:]
    assert [row["actor_staleness"] for row in rows] == [0, 1, 2, 0, 1, 2, 0]
    for row in rows:
        if row["actor_staleness"] == 0:
            assert row["rollout_logprob_gap"] == 0.0
        else:
            assert row["rollout_logprob_gap"] > 1e-4
