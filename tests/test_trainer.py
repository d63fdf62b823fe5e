"""End-to-end runs of the adapter on the embedded tiny model: the seed's SimplePG, outputs, hooks and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import pytest
import torch

from examples.simple_pg import SimplePG
from nanopost_trl import analysis, base, checkpoints
from nanopost_trl.config import Preset
from nanopost_trl.losses import GRPOLoss, Loss
from nanopost_trl.refill import GroupRefill
from nanopost_trl.trainer import Trainer, resume_checkpoint
from nanopost_trl.utils import read_rows


def smoke(tmp_path, **overrides):
    return Preset.TINY_SMOKE.make(**{"out_dir": str(tmp_path), "run_name": "run", **overrides})


@dataclasses.dataclass
class Recording(base.LossFn):
    """GRPO that keeps every LearnerBatch it sees (detached), to check what the adapter hands a loss."""

    inner: base.LossFn = dataclasses.field(default_factory=lambda: GRPOLoss(kl_coef=0.0))
    batches: list = dataclasses.field(default_factory=list)

    def __call__(self, batch):
        self.batches.append(
            {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
        )
        return self.inner(batch)

    def advantages(self, rewards):
        return self.inner.advantages(rewards)

    @property
    def uses_reference(self):
        return self.inner.uses_reference


def test_seed_simple_pg_runs_two_steps_unchanged(tmp_path):
    filters, environment = list(warnings.filters), dict(os.environ)
    summary = Trainer(smoke(tmp_path, kl_coef=0.0)).run(loss_fn=SimplePG(), tasks="addition")
    assert warnings.filters == filters and dict(os.environ) == environment  # no process-wide side effects
    rows = [json.loads(line) for line in summary.log_path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert "eval_addition_accuracy" in rows[0] and "eval_addition_accuracy" in rows[-1]
    for row in rows[1:]:
        for column in ("reward_mean", "reward_std", "response_len_mean", "loss", "grad_norm", "lr"):
            assert math.isfinite(row[column]), column
        assert row["generation_time_s"] > 0 and row["learning_time_s"] >= 0
        assert row["loss_kl"] >= 0  # SimplePG's own metric, prefixed
    config = json.loads(summary.config_path.read_text())
    assert config["loss"]["class"].endswith("SimplePG") and config["loss"]["args"] == {"kl_coef": 0.04}
    assert config["config"]["num_steps"] == 2 and config["tasks"] == ["addition"]
    assert {"torch", "trl", "transformers", "accelerate"} <= config["versions"].keys()
    assert (summary.model_dir / "model.safetensors").exists()
    assert "addition" in summary.eval_before and "addition" in summary.eval_after

    frame = analysis.load(tmp_path)
    assert list(frame["step"]) == [0, 1, 2] and set(frame["run_name"]) == {"run"}
    assert (frame["num_steps"] == 2).all() and "loss_args.kl_coef" in frame.columns


def test_learner_batch_shapes_and_reference_only_when_used(tmp_path):
    with_kl = Recording(inner=SimplePG())
    Trainer(smoke(tmp_path, run_name="kl")).run(loss_fn=with_kl, tasks="addition")
    batch = with_kl.batches[0]
    B, T = batch["policy_logprobs"].shape
    assert batch["loss_mask"].shape == (B, T + 1) and (batch["loss_mask"][:, 0] == 1).all()
    assert batch["advantages"].shape == (B, 1) and batch["rewards"].shape == (B,)
    assert batch["reference_logprobs"] is not None and batch["reference_logprobs"].shape == (B, T)
    torch.testing.assert_close(batch["rollout_logprobs"], batch["policy_logprobs"])  # on-policy
    # the fields after loss_mask: entropies of the same forward, the step's token count over its micro-batches
    assert batch["entropies"].shape == (B, T) and (batch["entropies"] * (1 - batch["loss_mask"][:, 1:]) == 0).all()
    assert batch["micro_batches_per_step"] == 1 and batch["num_items_in_batch"] == batch["loss_mask"][:, 1:].sum()
    lengths = batch["loss_mask"][:, 1:].sum(-1)
    assert batch["truncated"].dtype == torch.bool and batch["truncated"].shape == (B,)
    assert not batch["truncated"][lengths < T].any()  # a completion that ended early ended with EOS
    assert batch["reward_components"].shape == (B, 1) and batch["reward_names"] == ("correctness",)
    torch.testing.assert_close(batch["reward_components"][:, 0], batch["rewards"])

    without_kl = Recording()
    Trainer(smoke(tmp_path, run_name="nokl")).run(loss_fn=without_kl, tasks="addition")
    assert all(b["reference_logprobs"] is None for b in without_kl.batches)


def test_advantages_come_from_the_loss_estimator_over_whole_groups(tmp_path):
    class RankAdvantages(Recording):
        def advantages(self, rewards):
            return torch.arange(rewards.shape[1], dtype=rewards.dtype).expand_as(rewards) + 10 * rewards

    recording = RankAdvantages()
    cfg = smoke(tmp_path, micro_batch_size=2)  # 8 completions in 4 micro-batches: groups must be split after
    Trainer(cfg).run(loss_fn=recording, tasks="addition")
    seen = [
        (advantage.item(), reward.item())
        for batch in recording.batches
        for advantage, reward in zip(batch["advantages"][:, 0], batch["rewards"], strict=True)
    ]
    assert len(seen) == cfg.completions_per_step * cfg.num_steps
    ranks = sorted(round(adv - 10 * reward) for adv, reward in seen)
    assert ranks == sorted(list(range(cfg.responses_per_prompt)) * cfg.prompts_per_step * cfg.num_steps)


def test_crashing_reward_scores_zero_and_is_counted(tmp_path):
    def flaky(completions, instances):
        if len(completions) > 0:
            raise RuntimeError("grader bug")
        return []

    summary = Trainer(smoke(tmp_path)).run(tasks="addition", reward_fn=flaky)
    rows = [json.loads(line) for line in summary.log_path.read_text().splitlines()][1:]
    assert [row["reward_errors"] for row in rows] == [8.0, 8.0]
    assert all(row["reward_mean"] == 0.0 for row in rows)


def test_reward_fn_with_wrong_signature_fails_at_start(tmp_path):
    with pytest.raises(TypeError, match=r"reward_fn\(completions: list\[str\], instances"):
        Trainer(smoke(tmp_path)).run(tasks="addition", reward_fn=lambda completions: [0.0])


@dataclasses.dataclass
class BadLoss(base.LossFn):
    kind: str = "vector"

    def __call__(self, batch):
        if self.kind == "vector":
            return batch.policy_logprobs.sum(-1), {}
        if self.kind == "nograd":
            return torch.tensor(1.0), {}
        return batch.policy_logprobs.sum() * math.nan, {}


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("vector", ValueError, r"BadLoss must return a scalar loss tensor, got \(8,\) at step 1"),
        ("nograd", ValueError, r"BadLoss returned a loss without grad at step 1"),
        ("nan", FloatingPointError, r"BadLoss returned a non-finite loss \(nan\) at step 1"),
    ],
)
def test_bad_loss_output_names_the_loss_and_step(tmp_path, kind, error, message):
    with pytest.raises(error, match=message):
        Trainer(smoke(tmp_path, micro_batch_size=8)).run(loss_fn=BadLoss(kind), tasks="addition")


def test_skip_nonfinite_counts_skipped_steps(tmp_path):
    summary = Trainer(smoke(tmp_path, skip_nonfinite=True)).run(loss_fn=BadLoss("nan"), tasks="addition")
    rows = [json.loads(line) for line in summary.log_path.read_text().splitlines()][1:]
    assert [row["nonfinite_skipped"] for row in rows] == [1.0, 1.0]
    assert all(row["grad_norm"] == 0.0 for row in rows)


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gsm9k'; valid: .*addition.*gsm8k"):
        Trainer(smoke(tmp_path)).run(tasks="gsm9k")
    with pytest.raises(ValueError, match="unknown preset 'QWEN'; valid: TINY_CPU"):
        Preset.from_name("QWEN")
    with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
        Preset.TINY_SMOKE.make(learning_rte=1e-3)
    with pytest.raises(TypeError, match="loss_fn must be a nanopost_trl.base.LossFn"):
        Trainer(smoke(tmp_path)).run(loss_fn=Loss.GRPO, tasks="addition")


def test_loss_none_fields_filled_from_config(tmp_path):
    summary = Trainer(smoke(tmp_path, kl_coef=0.25)).run(loss_fn=GRPOLoss(), tasks="addition")
    args = json.loads(summary.config_path.read_text())["loss"]["args"]
    assert args["kl_coef"] == 0.25 and args["max_new_tokens"] == 8
    assert summary.final_metrics["loss_kl_ref"] >= 0  # the reference pass ran because kl_coef came from the config


def test_resume_latest_skips_a_checkpoint_killed_mid_save(tmp_path):
    for step, complete in ((3, True), (6, True), (9, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{}")
        if complete:  # the manifest is written last
            checkpoints.write_manifest(checkpoint, checkpoints.file_records(checkpoint, ["trainer_state.json"]))
    with pytest.warns(UserWarning, match=r"resuming from checkpoint-6, skipping .*\(checkpoint-9: no manifest\.json"):
        assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("loss", [member.name.lower() for member in Loss])
def test_every_builtin_loss_trains_end_to_end(tmp_path, loss):
    loss_fn = Loss.from_name(loss).make()
    summary = Trainer(smoke(tmp_path, num_steps=3, kl_coef=0.05)).run(loss_fn=loss_fn)
    rows = [json.loads(line) for line in summary.log_path.read_text().splitlines()][1:]
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        metrics = {k: v for k, v in row.items() if k.startswith("loss") or k == "grad_norm"}
        assert len(metrics) > 2
        # the run's kl_coef where the loss leaves it to the config; DAPO, GSPO, ... drop the KL term by default
        assert ("loss_kl_ref" in metrics) == (loss_fn.kl_coef is None)
        assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_mixed_tasks_and_reward_components_are_logged_apart(tmp_path):
    from nanopost_trl.rewards import Combined, Correctness, Format

    reward = Combined([(Correctness(), 1.0), (Format(r"^\d+$", name="digits_only"), 0.5)])
    cfg = smoke(tmp_path, prompts_per_step=4, num_steps=2, eval_pass_k=4)
    summary = Trainer(cfg).run(tasks=["addition", "countdown"], reward_fn=reward)
    row = summary.final_metrics
    assert {"reward_correctness_mean", "reward_digits_only_mean"} <= row.keys()
    assert row["reward_mean"] == pytest.approx(row["reward_correctness_mean"] + 0.5 * row["reward_digits_only_mean"])
    evals = {f"eval_{task}_{metric}" for task in ("addition", "countdown") for metric in ("accuracy", "pass@4")}
    assert evals <= row.keys() and all(0 <= row[key] <= 1 for key in evals)
    assert summary.eval_after.keys() == {"addition", "countdown", "addition pass@4", "countdown pass@4"}
    assert "held-out pass@4 [addition]:" in str(summary) and "held-out greedy accuracy [countdown]:" in str(summary)
    assert any(key.startswith("task_") and key.endswith("_reward_mean") for key in row)


def test_offloaded_reference_stays_on_cpu_and_still_scores(tmp_path):
    trainer = Trainer(smoke(tmp_path, offload_reference=True, kl_coef=0.1))
    summary = trainer.run(loss_fn=GRPOLoss())
    assert next(trainer.grpo_trainer.ref_model.parameters()).device.type == "cpu"
    assert summary.final_metrics["loss_kl_ref"] >= 0


@dataclasses.dataclass
class DropFlatGroups(Recording):
    """Keeps only the prompt groups whose rewards vary (DAPO's dynamic sampling)."""

    def keep_groups(self, rewards):
        return rewards.std(dim=-1) > 0


def mostly_flat_reward(completions, instances):
    """0.5 for every completion of two prompts in three (a flat group, no signal); else an integer that varies."""
    return [
        0.5 if sum(map(ord, str(instance.prompt))) % 3 else float(sum(map(ord, completion)) % 7)
        for completion, instance in zip(completions, instances, strict=True)
    ]


@pytest.mark.parametrize("refill_rounds", [0, 3])
def test_dropped_groups_train_nothing_and_refills_keep_the_step_full(tmp_path, refill_rounds):
    loss = DropFlatGroups()
    cfg = smoke(tmp_path, num_steps=3, prompts_per_step=4, micro_batch_size=16, refill_rounds=refill_rounds)
    summary = Trainer(cfg).run(loss_fn=loss, tasks="addition", reward_fn=mostly_flat_reward)
    assert [len(batch["rewards"]) for batch in loss.batches] == [cfg.completions_per_step] * cfg.num_steps
    for batch in loss.batches:
        flat = batch["rewards"] == 0.5
        assert (batch["loss_mask"][flat, 1:] == 0).all()  # dropped groups carry no loss ...
        assert batch["num_items_in_batch"] == batch["loss_mask"][:, 1:].sum()  # ... and no tokens in the count
    rows = read_rows(summary.log_path)[1:]
    assert sum(row["groups_dropped"] for row in rows) > 0
    refilled = [row["groups_refilled"] for row in rows]
    assert all(r == 0 for r in refilled) if refill_rounds == 0 else any(r > 0 for r in refilled)
    if refill_rounds:  # a refilled step trains on more varied groups than the first generation alone held
        kept = [int((batch["rewards"] != 0.5).sum()) for batch in loss.batches]
        assert max(kept) > cfg.completions_per_step / 3


def test_group_refill_selects_each_process_share_kept_groups_first():
    refill = GroupRefill(group_size=2, rows_per_process=4, num_processes=2)
    first = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # process 0 keeps 1 group, process 1 none
    assert refill.short([first])
    second = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert refill.short([first, second])  # process 1 holds one kept group of its two
    third = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert not refill.short([first, second, third])
    rows, kept = refill.select([refill.local(keep, 1) for keep in (first, second, third)])
    assert rows.tolist() == [4, 5, 10, 11] and kept.all()  # its kept groups of rounds 2 and 3
    rows, kept = refill.select([refill.local(keep, 0) for keep in (first, second)])
    assert rows.tolist() == [0, 1, 6, 7] and kept.all()  # round 1's kept group, then round 2's
    rows, kept = refill.select([refill.local(first, 1)])
    assert rows is None and not kept.any()  # one round: every row, the dropped ones masked
