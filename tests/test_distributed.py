"""Real multi-process runs on CPU: `accelerate launch --multi_gpu --num_processes 2` (torchrun + gloo on CPU), on one
"machine" or as two machines of one process each on localhost (ranks 0 and 1 meeting at 127.0.0.1).

(`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up: accelerate's CPU launcher.)"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers import ENV, REPO, accelerate_launch, free_port, launch_command

from nanopost_trl.utils import read_rows

SCRIPTS = Path(__file__).parent / "scripts"
UNUSED_PARAMETERS_WARNING = "find_unused_parameters=True"  # torch: "... was specified in DDP constructor, but did not"


def two_machine_launch(logs: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """Machines 0 and 1 of `--num_machines 2`, one process each, launched side by side as on two hosts; output goes
    to files in `logs` (a full pipe would block one machine while the other waits for it in a collective)."""
    port, launches, results = free_port(), [], []
    with contextlib.ExitStack() as files:
        for rank in (0, 1):
            out, err = (files.enter_context(open(logs / f"machine-{rank}.{kind}", "w+")) for kind in ("out", "err"))
            command = launch_command(*args, machines=2, machine_rank=rank, port=port)
            launches.append((subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, env=ENV), out, err))
        for process, out, err in launches:
            process.wait(timeout=600)
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read()))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def test_two_process_cli_run_logs_each_step_once(tmp_path):
    result = accelerate_launch(
        "-m", "nanopost_trl.train", "--preset", "TINY_SMOKE", "--out_dir", str(tmp_path), "--run_name", "ddp"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert result.stdout.count("held-out greedy accuracy") == 1  # the summary prints on the main process only
    assert "FutureWarning" not in result.stderr and "were not passed to `accelerate launch`" not in result.stderr


def test_groups_are_whole_prompts_and_loss_metrics_are_means_over_the_processes_that_have_them(tmp_path):
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
    assert [row["loss_only_rank1"] for row in rows[1:]] == [3.0] * 3  # ... that computed them


def test_step_normalised_losses_equal_trl_over_two_processes(tmp_path):
    """DAPO, CISPO, VESPO (and DAPO's entropy-quantile mask) normalise by the step's token count over processes:
    gradient-equal to TRL's own when the processes hold unequal token counts."""
    result = accelerate_launch(str(SCRIPTS / "ddp_loss_family.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"family-{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["tokens"] != reports[1]["tokens"]
    assert (
        reports[0]["num_items_in_batch"]
        == reports[1]["num_items_in_batch"]
        == reports[0]["tokens"] + reports[1]["tokens"]
    )
    for report in reports:
        for case in ("dapo", "cispo", "vespo", "dapo-top-entropy"):
            for key in (case, f"{case}-from-config"):
                assert report[key] < 1e-5, (key, report[key])


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_gated_loss_with_every_row_skipped_on_one_process(tmp_path, lora_r):
    """Kondo keeping nothing on process 0 and its top half on process 1 (tests/scripts/ddp_gated.py), under DDP with
    find_unused_parameters=False: every step completes, the processes' weights stay equal, no unused-parameter
    traversal warning."""
    result = accelerate_launch(str(SCRIPTS / "ddp_gated.py"), str(tmp_path), str(lora_r))
    assert result.returncode == 0, result.stderr[-3000:]
    assert UNUSED_PARAMETERS_WARNING not in result.stderr
    rows = read_rows(tmp_path / "gated.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert all(0 < row["backward_rows_frac"] <= 0.5 for row in rows[1:])  # the mean of process 0's 0 and process 1's
    assert any(row["grad_norm"] > 0 for row in rows[1:])
    weights = [json.loads((tmp_path / f"weights-{rank}.json").read_text()) for rank in (0, 1)]
    assert weights[0] == weights[1]  # both processes took part in every gradient all-reduce
    trained = [name for name in weights[0] if "lora_" in name]
    assert bool(trained) == bool(lora_r)


@pytest.mark.slow
def test_two_machines_log_and_checkpoint_once_and_resume(tmp_path):
    run = ("-m", "nanopost_trl.train", "--preset", "TINY_SMOKE", "--save_every", "1")
    run += ("--out_dir", str(tmp_path), "--run_name", "nodes")
    main, other = two_machine_launch(tmp_path, *run)
    rows = read_rows(tmp_path / "nodes.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]  # each step once: only the global main process writes the log
    # the summary once, from machine 0 (machine 1 may print library notices, e.g. DeepSpeed's "accelerator: CPU")
    assert main.stdout.count("held-out greedy accuracy") == 1 and "held-out" not in other.stdout
    assert json.loads((tmp_path / "nodes-config.json").read_text())["runtime"]["num_processes"] == 2
    for step in (1, 2):
        checkpoint = tmp_path / "nodes" / f"checkpoint-{step}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
        assert sorted(path.name for path in checkpoint.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    main, other = two_machine_launch(tmp_path, *run, "--num_steps", "3", "--resume", "latest")
    resumed = read_rows(tmp_path / "nodes.jsonl")
    assert [row["step"] for row in resumed] == [0, 1, 2, 3] and resumed[:3] == rows  # continued from checkpoint-2
    assert json.loads((tmp_path / "nodes" / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert f"held-out greedy accuracy [addition]: {rows[0]['eval_addition_accuracy']:.1%} -> " in main.stdout
    assert "held-out" not in other.stdout and (tmp_path / "nodes" / "final" / "model.safetensors").exists()
