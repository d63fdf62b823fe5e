"""The completions log (`out/{run_name}-completions.jsonl`) and TRL's `log_completions`, on real tiny runs of the
embedded model; `analysis.load_completions`."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from nanopost_trl import analysis
from nanopost_trl.base import group_normalized_advantages
from nanopost_trl.config import Preset, output_paths, to_grpo_config
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows, text_of

FIELDS = ["step", "task", "prompt", "completion", "reward", "advantage"]


def smoke(tmp_path, **overrides):
    return Preset.TINY_SMOKE.make(**{"out_dir": str(tmp_path), "run_name": "run", **overrides})


def first_digit_reward(completions: list[str], instances: list) -> list[float]:
    """The completion's first digit: spread within a group whenever its samples differ."""
    return [float(completion[0]) if completion[:1].isdigit() else 0.0 for completion in completions]


def test_every_completion_logged_holds_its_reward_and_its_groups_advantage(tmp_path):
    """With all 8 completions of a step logged (2 prompts x 4), each row's reward is the grader's on its completion,
    and the advantages are GRPO's group normalisation of the rewards of its prompt's 4 rows."""
    summary = Trainer(smoke(tmp_path, completions_per_step_logged=8)).run(
        tasks="addition", reward_fn=first_digit_reward
    )
    rows = read_rows(output_paths(smoke(tmp_path))["completions"])
    assert [row["step"] for row in rows] == [1] * 8 + [2] * 8
    assert all(list(row) == FIELDS and row["task"] == "addition" for row in rows)
    prompts = [text_of(instance.prompt) for instance in resolve_tasks("addition", "train")]
    for step in (1, 2):
        step_rows = [row for row in rows if row["step"] == step]
        assert [row["reward"] for row in step_rows] == first_digit_reward([r["completion"] for r in step_rows], [])
        groups = [step_rows[i : i + 4] for i in (0, 4)]
        for group in groups:
            assert len({row["prompt"] for row in group}) == 1 and group[0]["prompt"] in prompts
        expected = group_normalized_advantages(torch.tensor([[row["reward"] for row in g] for g in groups]))
        torch.testing.assert_close(torch.tensor([[row["advantage"] for row in g] for g in groups]), expected)
        logged_mean = read_rows(summary.log_path)[step]["reward_mean"]
        assert abs(sum(row["reward"] for row in step_rows) / 8 - logged_mean) < 1e-6  # the step's whole batch


def test_a_few_per_step_span_the_groups_and_resume_logs_each_step_once(tmp_path):
    cfg = smoke(tmp_path, completions_per_step_logged=3, save_every=1)
    Trainer(cfg).run(tasks="addition")
    path = output_paths(cfg)["completions"]
    first = read_rows(path)
    assert Counter(row["step"] for row in first) == {1: 3, 2: 3}  # rows 0, 3, 6 of 8: both prompts' groups
    assert len({row["prompt"] for row in first if row["step"] == 1}) == 2

    Trainer(cfg).run(tasks="addition", resume=str(tmp_path / "run" / "checkpoint-1"))  # step 2 again
    resumed = read_rows(path)
    assert Counter(row["step"] for row in resumed) == {1: 3, 2: 3} and resumed[:3] == first[:3]

    Trainer(smoke(tmp_path, completions_per_step_logged=3, num_steps=1)).run(tasks="addition")  # a fresh run
    assert Counter(row["step"] for row in read_rows(path)) == {1: 3}

    runs = analysis.load(tmp_path)  # the run logs only, not the completions files next to them
    assert set(runs["run_name"]) == {"run"} and "completion" not in runs
    completions = analysis.load_completions(tmp_path)
    assert list(completions.columns) == ["run_name", *FIELDS] and len(completions) == 3
    assert (completions["run_name"] == "run").all() and (completions["step"] == 1).all()


def test_zero_completions_per_step_writes_no_file_and_trls_table_is_passed_through(tmp_path, capsys):
    cfg = smoke(tmp_path, completions_per_step_logged=0, log_completions=True, num_completions_to_print=2)
    args = to_grpo_config(cfg, num_processes=1)
    assert args.log_completions and args.num_completions_to_print == 2
    Trainer(cfg).run(tasks="addition")
    assert not output_paths(cfg)["completions"].exists()
    with pytest.raises(FileNotFoundError, match=r"no \*-completions\.jsonl files in"):
        analysis.load_completions(tmp_path)
    assert "Step 1" in capsys.readouterr().out  # TRL's printed sample of (prompt, completion, reward)
