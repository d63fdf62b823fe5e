"""Real multi-process runs on CPU: `accelerate launch --multi_gpu --num_processes 2` (torchrun + gloo on CPU).

(`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up: accelerate's CPU launcher.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]  # as the README
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_two_process_cli_run_logs_each_step_once(tmp_path):
    result = accelerate_launch(
        "-m", "nanopost_trl.train", "--preset", "TINY_SMOKE", "--out_dir", str(tmp_path), "--run_name", "ddp"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert result.stdout.count("held-out greedy accuracy") == 1  # the summary prints on the main process only
    assert "FutureWarning" not in result.stderr and "were not passed to `accelerate launch`" not in result.stderr


def test_groups_are_whole_prompts_and_loss_metrics_are_means_over_processes(tmp_path):
    result = accelerate_launch(str(SCRIPTS / "ddp_groups.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    groups = [json.loads((tmp_path / f"groups-{rank}.json").read_text()) for rank in (0, 1)]
    assert groups[0] == groups[1]  # both processes estimate advantages over the same gathered groups
    assert len(groups[0]) == 3 * 4  # steps x prompts
    for group in groups[0]:
        assert len(group) == 4 and len(set(group)) == 1, group  # one prompt's 4 completions, never a mix
    rows = [json.loads(line) for line in (tmp_path / "ddp.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert [row["loss_rank"] for row in rows[1:]] == [0.5] * 3  # loss metrics: the mean over processes
