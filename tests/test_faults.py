"""The faults of a real cluster, each injected for real: a SIGTERM to a running CLI run, a truncated weights file, a
full (tmpfs) disk, and, in the slow tests, a SIGKILLed or hung process of a 2-process `accelerate launch` and an
elastic restart. Each checks the run log (every step exactly once, no partial row) and the model left behind."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from accelerate import PartialState
from helpers import ENV, REPO, free_port, launch_command
from transformers import AutoModelForCausalLM

from nanopost_trl import analysis, checkpoints, faults, tasks
from nanopost_trl.config import Preset
from nanopost_trl.run_log import append_row, step_trouble
from nanopost_trl.tasks import resolve_tasks
from nanopost_trl.trainer import Trainer
from nanopost_trl.utils import read_rows


def smoke(out_dir: Path, **overrides):
    return Preset.TINY_SMOKE.make(out_dir=str(out_dir), run_name="r", **overrides)


def steps(log: Path) -> list[int]:
    return [row["step"] for row in read_rows(log)] if log.exists() else []


def assert_whole_lines(log: Path) -> None:
    """Every line of the log is a complete JSON row (none cut off)."""
    for line in log.read_text().splitlines():
        assert "step" in json.loads(line)


# --- atomic, verified checkpoints
def test_saves_are_renamed_into_place_whole_and_resume_skips_a_truncated_checkpoint(tmp_path):
    Trainer(smoke(tmp_path, num_steps=4, save_every=2)).run(tasks="addition")
    run_dir = tmp_path / "r"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert not (tmp_path / checkpoints.STAGING).exists()  # no staging directory left behind
    for saved in ("checkpoint-2", "checkpoint-4", "final"):
        assert checkpoints.verify(run_dir / saved) is None
    manifest = json.loads((run_dir / "checkpoint-4" / checkpoints.MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest)

    weights = run_dir / "checkpoint-4" / "model.safetensors"  # as if copied back from a failed sync
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    skipped = r"resuming from checkpoint-2, skipping .*checkpoint-4: model\.safetensors has"
    with pytest.warns(UserWarning, match=skipped):
        summary = Trainer(smoke(tmp_path, num_steps=6, save_every=2)).run(tasks="addition", resume=True)
    assert steps(summary.log_path) == list(range(7))  # steps 3 and 4 again, from checkpoint-2: each exactly once
    assert checkpoints.verify(run_dir / "checkpoint-4") is None  # saved again, whole
    assert AutoModelForCausalLM.from_pretrained(summary.model_dir) is not None


def test_resume_with_no_verified_checkpoint_left_is_a_one_line_error(tmp_path):
    Trainer(smoke(tmp_path, num_steps=2, save_every=2, save_final_model=False)).run(tasks="addition")
    (tmp_path / "r" / "checkpoint-2" / "optimizer.pt").unlink()
    none_left = r"no complete checkpoint .* \(checkpoint-2: optimizer\.pt is missing\)"
    with pytest.raises(FileNotFoundError, match=none_left):
        Trainer(smoke(tmp_path, num_steps=4)).run(tasks="addition", resume=True)
    named = tmp_path / "r" / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match=r"cannot resume from .*checkpoint-2: optimizer\.pt is missing"):
        Trainer(smoke(tmp_path, num_steps=4)).run(tasks="addition", resume=str(named))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system at `path` (tmpfs), unmounted afterwards; skips where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    with tmpfs(tmp_path / "disk", "40m") as disk:  # one checkpoint (~32 MB) fits, a second does not
        with pytest.raises(checkpoints.DiskError) as stopped:
            Trainer(smoke(disk, num_steps=6, save_every=2)).run(tasks="addition")
        message = str(stopped.value)
        assert "\n" not in message
        assert f"cannot write {disk / 'r' / 'checkpoint-4'}: no space left on device (needs about 0.03 GB" in message
        assert [p.name for p in (disk / "r").iterdir() if p.is_dir()] == ["checkpoint-2"]  # the latest still
        assert not (disk / checkpoints.STAGING).exists()  # the partial save was removed
        assert checkpoints.resume_point(disk / "r")[0] == disk / "r" / "checkpoint-2"
        assert AutoModelForCausalLM.from_pretrained(disk / "r" / "checkpoint-2") is not None
        assert_whole_lines(disk / "r.jsonl")
        assert steps(disk / "r.jsonl") == [0, 1, 2, 3, 4]


def test_a_read_only_disk_stops_a_save_in_one_line(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "r").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        def write(staging: Path) -> None:
            staging.mkdir(parents=True)
            (staging / "model.safetensors").write_bytes(b"")

        with pytest.raises(checkpoints.DiskError, match=r"^cannot write .*/r/final: read-only file system$"):
            checkpoints.save_atomically(PartialState(), disk / "r" / "final", write, lambda: None)
        assert list((disk / "r").iterdir()) == []


def test_a_full_disk_leaves_no_partial_row_in_the_log(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        log = disk / "r.jsonl"
        append_row(log, {"step": 1, "reward_mean": 0.5})
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:  # fill the disk up to its last block
                filler.write(b"x" * 512)
        with pytest.raises(checkpoints.DiskError, match=r"r\.jsonl: no space left on device; the log ends at the row"):
            append_row(log, {"step": 2, "text": "y" * 8192})
        assert steps(log) == [1] and log.read_text().endswith("\n")


# --- preemption
SIGNAL_RUN = ("--preset", "TINY_SMOKE", "--prompts_per_step", "4", "--max_new_tokens", "24", "--eval_size", "4")


def cli(out_dir: Path, num_steps: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "nanopost_trl.train", *SIGNAL_RUN, "--num_steps", str(num_steps),
        "--out_dir", str(out_dir), "--run_name", "r", *args,
    ]  # fmt: skip


ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1"}


def signal_during_run(out_dir: Path, num_steps: int, after_steps: int, *args: str) -> tuple[int, int, str]:
    """Start the CLI run, send SIGTERM once it has logged `after_steps` training steps past its first (then a second
    SIGTERM at once: the save must not be cut); return (its exit code, the step it said the signal came in, its
    stderr). The run says that step itself: polling the log cannot race a fast step."""
    log = out_dir / "r.jsonl"
    first = max(steps(log), default=0) + 1  # a resumed run logs again from its checkpoint's step + 1
    command = cli(out_dir, num_steps, *args)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ONE_THREAD)
    deadline = time.monotonic() + 300
    while max(steps(log), default=0) < first + after_steps and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    said = re.search(r"SIGTERM during step (\d+):", stderr)
    return process.returncode, int(said.group(1)) if said else -1, stderr


def check_stopped_within_a_step(out_dir: Path, returncode: int, logged: int, stderr: str) -> int:
    """The run stopped after the step the signal arrived in (or the next), saved it, and says how to resume."""
    if returncode == 0:  # the signal came during the last step: the run finished and saved its final model
        return -1
    assert returncode == faults.PREEMPTED_EXIT_CODE, stderr[-3000:]
    stopped = max(steps(out_dir / "r.jsonl"))
    assert 1 <= logged <= stopped <= logged + 1, (logged, stopped)  # the step it came in, or the next
    assert checkpoints.resume_point(out_dir / "r")[0] == out_dir / "r" / f"checkpoint-{stopped}"
    assert "--run_name r --resume latest" in stderr and "SIGTERM again: already stopping" in stderr
    assert "Traceback" not in stderr
    return stopped


def test_sigterm_saves_within_a_step_and_resume_logs_every_step_once(tmp_path):
    returncode, logged, stderr = signal_during_run(tmp_path, 8, 0, "--save_every", "0")
    assert check_stopped_within_a_step(tmp_path, returncode, logged, stderr) >= 1
    resumed = subprocess.run(cli(tmp_path, 8, "--resume", "latest"), capture_output=True, text=True, cwd=REPO,
                             env=ONE_THREAD)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps(tmp_path / "r.jsonl") == list(range(9))
    assert checkpoints.verify(tmp_path / "r" / "final") is None


@pytest.mark.slow
def test_ten_sigterms_at_random_points_each_save_within_a_step_and_the_run_completes(tmp_path):
    rng = random.Random(0)
    stops = []
    for trial in range(10):
        resume = ("--resume", "latest") if trial else ()
        returncode, logged, stderr = signal_during_run(tmp_path, 60, rng.randint(0, 3), *resume)
        stops.append(check_stopped_within_a_step(tmp_path, returncode, logged, stderr))
        assert steps(tmp_path / "r.jsonl") == list(range(max(steps(tmp_path / "r.jsonl")) + 1))  # each once
        if stops[-1] == -1:
            break
    if stops[-1] != -1:
        command = cli(tmp_path, 60, "--resume", "latest")
        finished = subprocess.run(command, capture_output=True, cwd=REPO, env=ONE_THREAD)
        assert finished.returncode == 0
    assert sum(stop > 0 for stop in stops) == 10, stops
    assert steps(tmp_path / "r.jsonl") == list(range(61))  # the same final step count, every row exactly once
    assert checkpoints.verify(tmp_path / "r" / "final") is None


def test_the_resume_command_replaces_run_name_and_resume():
    argv = ["--preset", "TINY_SMOKE", "--run_name=old", "--resume", "checkpoint-3", "--num_steps", "9"]
    command = faults.resume_command(argv, "r")
    assert command.endswith("-m nanopost_trl.train --preset TINY_SMOKE --num_steps 9 --run_name r --resume latest")


# --- a lost process of a 2-process run
class TwoProcessRun:
    """`accelerate launch` of the CLI on 2 CPU processes (gloo), its output in a file; finds its workers' pids by a
    token in their environment."""

    def __init__(self, out_dir: Path, *args: str, launcher_args: tuple[str, ...] = ()) -> None:
        self.token, self.output = uuid.uuid4().hex, out_dir.parent / f"{out_dir.name}.out"
        self.log = out_dir / "r.jsonl"
        command = launch_command(*launcher_args, "-m", "nanopost_trl.train", *SIGNAL_RUN, "--out_dir", str(out_dir),
                                 "--run_name", "r", "--collective_timeout_s", "20", *args)  # fmt: skip
        with open(self.output, "w") as output:
            env = {**ENV, "NANOPOST_TEST_TOKEN": self.token}
            self.launcher = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def text(self) -> str:
        return self.output.read_text()

    def wait_until(self, done, what: str) -> None:
        deadline = time.monotonic() + 400
        while not done():
            assert self.launcher.poll() is None and time.monotonic() < deadline, f"{what}: {self.text()[-3000:]}"
            time.sleep(0.1)

    def worker_pid(self, rank: int) -> int:
        marks = {f"NANOPOST_TEST_TOKEN={self.token}".encode(), f"RANK={rank}".encode()}
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and marks <= set((entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
        raise AssertionError(f"no worker of rank {rank}")


def exit_time(pid: int, since: float, limit_s: float) -> float:
    """Seconds from `since` until process `pid` is gone (a zombie counts as gone)."""
    while time.monotonic() - since < limit_s:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "Z":
                time.sleep(0.1)
                continue
        return time.monotonic() - since
    raise AssertionError(f"process {pid} still running {limit_s} s later")


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_process_is_named_by_the_survivor_within_the_collective_timeout(tmp_path, fault):
    run = TwoProcessRun(tmp_path / "out", "--num_steps", "200")
    run.wait_until(lambda: max(steps(run.log), default=0) >= 2, "training")
    survivor, lost = run.worker_pid(0), run.worker_pid(1)
    os.kill(lost, fault)
    start = time.monotonic()
    try:
        seconds = exit_time(survivor, start, limit_s=20 + 15)  # collective_timeout_s + 15
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(lost, signal.SIGKILL)  # a hung process: the launcher would wait 30 s before killing it
    run.launcher.wait(timeout=120)
    print(f"{fault.name}: the survivor exited {seconds:.1f} s after the fault")
    assert "nanopost-trl: error: process rank 1 of 2 is lost" in run.text()
    assert run.launcher.returncode != 0
    assert_whole_lines(run.log)
    assert steps(run.log) == list(range(max(steps(run.log)) + 1))


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_newest_checkpoint_and_completes(tmp_path):
    run = TwoProcessRun(
        tmp_path / "out", "--num_steps", "12", "--save_every", "3", launcher_args=("--max_restarts", "1")
    )
    run.wait_until(lambda: (tmp_path / "out" / "r" / "checkpoint-3").exists(), "the first checkpoint")
    os.kill(run.worker_pid(1), signal.SIGKILL)
    assert run.launcher.wait(timeout=400) == 0, run.text()[-3000:]
    assert "process rank 1 of 2 is lost" in run.text() and "elastic restart 1: resuming run r" in run.text()
    assert steps(run.log) == list(range(13))  # every step exactly once across the two attempts
    assert checkpoints.verify(tmp_path / "out" / "r" / "final") is None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "r" / "final") is not None


# --- bad input and silent trouble
def test_a_missing_model_path_or_a_corrupt_config_fails_in_one_line_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"model '.*/no-model': no such local directory or file"):
        Trainer(smoke(tmp_path, model=str(tmp_path / "no-model"))).run(tasks="addition")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(ValueError, match=r"model '.*/broken': its config.json is not valid JSON") as error:
        Trainer(smoke(tmp_path, model=str(broken))).run(tasks="addition")
    assert "\n" not in str(error.value)


def test_vllm_server_mode_is_checked_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"vllm_mode='server' needs use_vllm=True"):
        smoke(tmp_path, vllm_mode="server")
    cfg = smoke(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=free_port())
    with pytest.raises(ConnectionError, match=r"no vLLM server at 127\.0\.0\.1:\d+") as error:
        Trainer(cfg).run(tasks="addition")
    assert any(entry.name == "check_before_loading" for entry in error.traceback)


def test_an_empty_dataset_file_fails_in_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"the data file .*empty\.jsonl is empty \(no rows\)"):
        tasks.from_dataset(tmp_path / "empty.jsonl")


def unscorable(completions: list[str], instances: list) -> list[float]:
    """A RewardFn that could score none of its completions (NaN: scored 0 and counted as reward errors)."""
    return [float("nan")] * len(completions)


def test_reward_errors_show_on_the_step_line_and_training_instances_as_eval_warn(tmp_path, capsys):
    instances = resolve_tasks("addition", "train")[:16]
    with pytest.warns(UserWarning, match=r"no eval_tasks: the 'held-out' eval scores the first 16 training instances"):
        summary = Trainer(smoke(tmp_path)).run(tasks=instances, reward_fn=unscorable)
    rows = read_rows(summary.log_path)
    assert rows[1]["reward_errors"] == 8  # every completion of the step: scored 0 and counted
    assert "! 8 reward errors (scored 0)" in capsys.readouterr().out


def test_step_trouble_names_tool_failures_and_skipped_updates():
    row = {"step": 3, "reward_mean": 0.5, "tool_errors": 2.0, "tool_timeouts": 1.0, "nonfinite_skipped": 0.5}
    assert step_trouble(row) == "2 tool errors, 1 tool time-outs, update skipped (non-finite loss)"
    assert step_trouble({"step": 3, "reward_errors": 0.0}) == ""


def test_analysis_counts_optimizer_steps_and_refuses_a_completions_file_as_a_run_log(tmp_path):
    summary = Trainer(smoke(tmp_path, num_iterations=2, num_steps=4)).run(tasks="addition")
    assert analysis.summary(analysis.load(tmp_path))["steps"].tolist() == [4]  # rewards on 2 generation steps only
    completions = tmp_path / "r-completions.jsonl"
    with pytest.raises(ValueError, match=r"is a completions file: read it with analysis\.load_completions"):
        analysis.load(completions)
    with pytest.raises(ValueError, match=r"is a run log, not a \*-completions\.jsonl file"):
        analysis.load_completions(summary.log_path)
