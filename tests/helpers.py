"""Helpers shared by test modules: TRL's own GRPOConfig for the gradient-equality tests, and real multi-process runs
(`accelerate launch` with this checkout's package on the path and one OpenMP thread per process, which torchrun sets
only for 2+ per machine; a free localhost port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
ENV["OMP_NUM_THREADS"] = "1"


def grpo_args(output_dir: Path, **options: Any) -> GRPOConfig:
    """TRL's GRPOConfig for a one-step fp32 comparison run (4 completions a prompt, clip 0.2, no W&B), with `options`
    (batch size, max_completion_length, beta, loss_type, ...) on top."""
    settings = dict(
        output_dir=str(output_dir),
        num_generations=4,
        epsilon=0.2,
        report_to="none",
        max_steps=1,
        seed=0,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),  # under torchrun on CPU: gloo, as a run's config (to_grpo_config)
    )
    return GRPOConfig(**(settings | options))


def launch_command(*args: str, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    """`accelerate launch` of 2 processes in all, over `machines` machines (the README's CPU command)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
        command += ["--main_process_port", str(port)]
    return [*command, *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    """`command` from the repository root, output captured, stopped after 10 minutes."""
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    return run(launch_command(*args))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
