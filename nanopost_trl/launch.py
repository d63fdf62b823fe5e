"""Launch checks: how a run's completions split over a launch's processes (`micro_batches`), what a sharded launch
cannot run (`check_sharding`, `check_launch`), the launch accelerate set up (`Sharding.of_this_launch`),
and a vLLM server that answers (`check_vllm_server`)."""

from __future__ import annotations

import dataclasses
import os
import socket
from urllib.parse import urlparse

from nanopost_trl.config import TrainConfig


def micro_batches(cfg: TrainConfig, num_processes: int) -> tuple[int, int]:
    """(completions per forward/backward, micro-batches accumulated per optimizer step) on each of `num_processes`;
    a ValueError when the step's completions do not split evenly."""
    if cfg.completions_per_step % num_processes:
        raise ValueError(
            f"prompts_per_step x responses_per_prompt = {cfg.completions_per_step} must divide evenly over "
            f"{num_processes} processes"
        )
    per_process = cfg.completions_per_step // num_processes
    micro_batch = min(cfg.micro_batch_size, per_process)
    if per_process % micro_batch:
        raise ValueError(
            f"micro_batch_size={cfg.micro_batch_size} must divide the {per_process} completions each process "
            f"handles per step (prompts_per_step x responses_per_prompt over {num_processes} process(es))"
        )
    if cfg.refill_rounds and per_process % cfg.responses_per_prompt:
        raise ValueError(
            f"refill_rounds needs whole prompt groups on each process: responses_per_prompt="
            f"{cfg.responses_per_prompt} must divide the {per_process} completions each process handles per step"
        )
    return micro_batch, per_process // micro_batch


def check_sharding(cfg: TrainConfig, *, zero_stage: int = 0, fsdp: bool = False) -> None:
    """Refuse the features that need what a sharded launch (DeepSpeed ZeRO `zero_stage`, or FSDP) does not give a
    process: a full actor copy of the weights (`sync_interval > 1`; ZeRO-3, FSDP), or a reference model it may
    move to the CPU (`offload_reference`; DeepSpeed and FSDP place it themselves)."""
    sharded = "FSDP" if fsdp else "ZeRO-3" if zero_stage == 3 else None
    if cfg.sync_interval > 1 and sharded:
        raise ValueError(f"sync_interval > 1 keeps a full actor copy of the weights: not supported with {sharded}")
    if cfg.offload_reference and zero_stage:
        raise ValueError("offload_reference: use DeepSpeed's own offload_param_device for the reference instead")
    if cfg.offload_reference and fsdp:
        raise ValueError(
            "offload_reference: not supported with FSDP, which shards the reference over the processes "
            "(fsdp_offload_params: true offloads every shard to CPU)"
        )


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a launch of `num_processes` splits the model state: DeepSpeed ZeRO `zero_stage` (0: none), or FSDP2."""

    num_processes: int
    zero_stage: int
    fsdp: bool

    @classmethod
    def of_this_launch(cls) -> Sharding:
        """accelerate's environment (processes, ZeRO stage, FSDP), else one process without sharding."""
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        return cls(
            num_processes=int(os.environ.get("WORLD_SIZE", "1")),
            zero_stage=int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")) if deepspeed else 0,
            fsdp=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
        )

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    def over(self, sharded: bool) -> int:
        """The divisor of a state that is sharded (`sharded`) under this launch."""
        return self.num_processes if sharded else 1

    @property
    def weights(self) -> int:
        return self.over(self.zero_stage == 3 or self.fsdp)

    @property
    def gradients(self) -> int:
        return self.over(self.zero_stage >= 2 or self.fsdp)

    @property
    def optimizer(self) -> int:
        return self.over(self.deepspeed or self.fsdp)


VLLM_CONNECT_TIMEOUT_S = 5.0  # a server that is up accepts at once; TRL's own loop then waits for its health check


def check_vllm_server(host: str, port: int, base_url: str | None = None) -> None:
    """Raise a one-line ConnectionError unless a TCP connection to the vLLM server opens within
    `VLLM_CONNECT_TIMEOUT_S` (TRL's client retries for `vllm_server_timeout`, and its health check has no connect
    timeout of its own: an unroutable host would hang there for minutes)."""
    if base_url is not None:
        url = urlparse(base_url if "://" in base_url else f"http://{base_url}")
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=VLLM_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(
            f"vllm_mode='server': no vLLM server at {host}:{port} ({error.strerror or error}); start it first "
            f"(`trl vllm-serve --model ... --port {port}`) or set vllm_server_host / vllm_server_port"
        ) from None


def check_launch(trainer, cfg) -> None:
    """Refuse what this launch's sharding cannot run (`check_sharding`), and an FSDP config that accelerate
    did not turn into FSDP (it does so on GPUs only: CPU processes would silently run plain DDP)."""
    if Sharding.of_this_launch().fsdp and not trainer.is_fsdp_enabled:
        raise ValueError(
            "an FSDP accelerate config, but accelerate enables FSDP on GPUs only (on CPU processes it would run "
            "plain DDP): launch CPU processes with --multi_gpu instead"
        )
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0
    check_sharding(cfg, zero_stage=zero_stage, fsdp=trainer.is_fsdp_enabled)
