"""What a run does when the cluster stops it: a preemption signal, a lost process, an elastic restart.

- `Preemption`: SIGTERM or SIGUSR1 (SLURM's `--signal`, Kubernetes' pod deletion) lets the current optimizer step
  finish, saves a checkpoint, stops training, and `Trainer.run` raises `Preempted` (exit code `PREEMPTED_EXIT_CODE`,
  which a job script requeues on). A second signal while saving is noted and ignored: the save is not cut.
- `PeerWatch`: in a multi-process run each process bumps a counter in the launcher's store every few seconds; a
  process whose counter stops for `collective_timeout_s` is lost, and the survivors stop with `LostProcess` naming
  its rank instead of waiting in a collective.
- `elastic_restart`: under torchrun / `accelerate launch --max_restarts N`, a restarted group resumes its run from the
  newest complete checkpoint by itself (`init_restarted_group` makes its process group afresh).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import TrainerCallback

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"; the README's sbatch script requeues on it
LOST_PROCESS_EXIT_CODE = 76
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HEARTBEAT_S = 2.0


def say(note: str) -> None:
    print(f"nanopost-trl: {note}", file=sys.stderr, flush=True)


class Preempted(SystemExit):
    """The run stopped on a preemption signal after saving `checkpoint`; exits `PREEMPTED_EXIT_CODE` if uncaught."""

    def __init__(self, run_name: str, checkpoint: str, step: int, signal_name: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.run_name, self.checkpoint, self.step, self.signal_name = run_name, checkpoint, step, signal_name


class LostProcess(RuntimeError):
    """Another process of the run stopped answering (killed, out of memory, its node lost); one-line message."""


def ignore_signals_once_complete() -> None:
    """For the rest of the process (the command line after a completed run: the final model is saved, the summary
    still to print): a preemption signal is ignored, saying so, so the process exits normally, not killed by it."""

    def on_signal(number: int, frame) -> None:
        say(f"{signal.Signals(number).name} after the run completed: exiting normally")

    if threading.current_thread() is threading.main_thread():
        for number in PREEMPTION_SIGNALS:
            signal.signal(number, on_signal)


class Preemption(TrainerCallback):
    """On SIGTERM / SIGUSR1 (any process): finish the step, save a checkpoint, stop training (every process). Added
    after `RunLogger`, so the step's row is in the log before the checkpoint is saved."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # the first signal this process received
        self.stopped_step: int | None = None  # the step training stopped after, once it has
        self.running_step = 0  # the optimizer step in progress (0: training has not started)

    @contextlib.contextmanager
    def handlers_installed(self) -> Iterator[None]:
        """Inside the block, the preemption signals set the stop flag (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self.on_signal) for number in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            if self.signal_name is None:  # once stopping, a further signal must not kill the exit (save, exit 75)
                for number, handler in previous.items():
                    signal.signal(number, handler)

    def on_signal(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_name is not None:
            say(f"{name} again: already stopping; the checkpoint being saved is not interrupted")
            return
        self.signal_name = name
        say(f"{name} during step {self.running_step}: finishing it, then saving a checkpoint and stopping")

    def on_step_begin(self, args, state, control, **kwargs):
        self.running_step = state.global_step + 1

    def requested(self) -> bool:
        """Whether any process received a signal (a reduction over processes: they stop at the same step)."""
        flag = self.signal_name is not None
        state = PartialState()
        if state.num_processes > 1:
            flag = bool(reduce(torch.tensor([float(flag)], device=state.device), "sum").item())
        return flag

    def on_log(self, args, state, control, logs=None, **kwargs):
        """After the step's row is logged, the last point before transformers decides whether to save."""
        if logs and "loss" in logs and self.stopped_step is None and self.requested():
            self.signal_name = self.signal_name or "a signal to another process"
            self.stopped_step = state.global_step
            control.should_save = True
            control.should_training_stop = True


class PeerWatch:
    """A thread that bumps this process's counter in the launcher's store every `HEARTBEAT_S` seconds and stops the
    process (naming the rank) when another's counter has not moved for `timeout_s`; `lost_ranks` answers the same
    question on demand, after a collective failed."""

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.prefix = f"nanopost/heartbeat/{elastic_restart()}/"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="nanopost-peer-watch", daemon=True)

    def counts(self) -> list[int]:
        """Each rank's heartbeat count; a rank that has finished its watched block counts as always moving (-1)."""
        return [
            -1 if self.store.check([f"{self.prefix}done/{rank}"]) else self.store.add(f"{self.prefix}{rank}", 0)
            for rank in range(self.world_size)
        ]

    def beat(self) -> None:
        last_counts, last_moved = None, [time.monotonic()] * self.world_size
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.store.add(f"{self.prefix}{self.rank}", 1)
                counts = self.counts()
            except (RuntimeError, OSError) as error:  # torch's DistStoreError is a RuntimeError
                self.stop_process(f"the launcher's store at {self.where()} stopped answering ({error})")
                return
            now = time.monotonic()
            if last_counts is not None:
                last_moved = [
                    now if c != o or c < 0 else t for c, o, t in zip(counts, last_counts, last_moved, strict=True)
                ]
            last_counts = counts
            silent = [rank for rank, moved in enumerate(last_moved) if now - moved > self.timeout_s]
            if silent:
                self.stop_process(lost_message(silent, self.world_size, f"silent for over {self.timeout_s:.0f} s"))
                return

    def where(self) -> str:
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"

    def stop_process(self, message: str) -> None:
        """Called from the watch thread: the main thread may be blocked in a collective, so exit from here."""
        say(f"error: {message}")
        os._exit(LOST_PROCESS_EXIT_CODE)

    def lost_ranks(self) -> list[int]:
        """The ranks whose counters do not move over three heartbeats (this process's own keeps moving)."""
        try:
            before = self.counts()
            time.sleep(3 * HEARTBEAT_S)
            after = self.counts()
        except (RuntimeError, OSError):
            return [0]  # the store is served by the launcher of node 0: unreachable, that node is gone
        return [
            rank for rank, (b, a) in enumerate(zip(before, after, strict=True)) if a == b >= 0 and rank != self.rank
        ]

    @contextlib.contextmanager
    def running(self) -> Iterator[PeerWatch]:
        self.store.add(f"{self.prefix}{self.rank}", 1)
        self.thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            with contextlib.suppress(RuntimeError, OSError):
                self.store.set(f"{self.prefix}done/{self.rank}", "1")


def lost_message(ranks: list[int], world_size: int, how: str) -> str:
    named = ", ".join(str(rank) for rank in ranks)
    return (
        f"process rank {named} of {world_size} is lost (killed, out of memory, or its node is gone; {how}); "
        "stopping. Resume from the newest complete checkpoint with --resume latest"
    )


@contextlib.contextmanager
def peers_watched(accelerator, timeout_s: float) -> Iterator[None]:
    """In a multi-process run: a `PeerWatch` while the block runs, and a collective that fails inside it because a
    process is gone becomes `LostProcess` naming its rank."""
    if accelerator.num_processes == 1 or "MASTER_ADDR" not in os.environ:
        yield
        return
    try:
        watch = PeerWatch(accelerator.process_index, accelerator.num_processes, timeout_s)
    except (RuntimeError, OSError) as error:
        say(f"warning: no watch on the other processes (the launcher's store did not answer: {first_line(error)})")
        yield
        return
    with watch.running():
        try:
            yield
        except (RuntimeError, torch.distributed.DistError) as error:
            lost = watch.lost_ranks()
            if not lost:
                raise
            raise LostProcess(
                lost_message(lost, accelerator.num_processes, f"a collective failed: {first_line(error)}")
            ) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def elastic_restart() -> int:
    """How many times torchrun's elastic agent has restarted this group (0: the first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_restarted_group(timeout_s: float) -> None:
    """After an elastic restart, make the process group in the launcher's store under a prefix of this attempt.

    torchrun's static rendezvous (the one `accelerate launch` uses) keeps one store across restarts, and the restarted
    processes would meet the previous attempt's addresses there (gloo: "connectFullMesh failed ... Connection
    refused"; the same stale keys hang NCCL's set-up). accelerate then uses this group as it is."""
    if not elastic_restart() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if torch.distributed.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    torch.distributed.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=torch.distributed.PrefixStore(f"nanopost/attempt_{elastic_restart()}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def resume_command(argv: list[str], run_name: str) -> str:
    """The command line that continues a stopped run: `argv` with its --run_name / --resume replaced by this run's
    name and `--resume latest` (under a launcher, the launcher's options go before `-m nanopost_trl.train`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--run_name", "--resume"):
            skip = True
        elif not arg.startswith(("--run_name=", "--resume=")):
            kept.append(arg)
    launcher = "accelerate launch [the same options]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python"
    return shlex.join([*launcher.split(" "), "-m", "nanopost_trl.train", *kept, "--run_name", run_name,
                       "--resume", "latest"]).replace("'[the same options]'", "[the same options]")  # fmt: skip
