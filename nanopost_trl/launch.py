"""Launch checks: how a run's completions split over a launch's processes (`micro_batches`), and what a sharded
launch cannot run (`check_sharding`)."""

from __future__ import annotations

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
