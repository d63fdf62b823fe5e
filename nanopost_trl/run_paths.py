"""Where a run writes (`run_files`, `output_paths`: its log, completions log, config record, checkpoints), and which run
`--resume latest` continues (`run_to_resume`)."""

from __future__ import annotations

from pathlib import Path

from nanopost_trl.checkpoints import latest_checkpoint
from nanopost_trl.config import TrainConfig

COMPLETIONS_SUFFIX = "-completions.jsonl"  # out/{run_name}-completions.jsonl, next to the run log


def run_to_resume(cfg: TrainConfig) -> str:
    """The run `--resume latest` continues: `cfg.run_name`, else the run in `out_dir` with the newest complete
    checkpoint. A ValueError when there is none to resume."""
    out = Path(cfg.out_dir)
    if cfg.run_name is not None:
        if latest_checkpoint(out / cfg.run_name) is None:
            raise ValueError(f"no checkpoint of run {cfg.run_name!r} to resume in {out / cfg.run_name}")
        return cfg.run_name
    checkpoints = [c for run in out.glob("*") if run.is_dir() and (c := latest_checkpoint(run)) is not None]
    if not checkpoints:
        raise ValueError(
            f"no run to resume in out_dir={str(out)!r}: no run directory there has a complete checkpoint "
            "(runs checkpoint with --save_every N)"
        )
    return max(checkpoints, key=lambda c: c.stat().st_mtime).parent.name


def run_files(out_dir: str | Path, run_name: str) -> dict[str, Path]:
    """The files of run `run_name` in `out_dir`: the per-step log, the sampled completions, the config record, the
    checkpoint directory. The one place their names are made."""
    out = Path(out_dir)
    return {
        "log": out / f"{run_name}.jsonl",
        "completions": out / f"{run_name}{COMPLETIONS_SUFFIX}",
        "config": out / f"{run_name}-config.json",
        "checkpoints": out / run_name,
    }


def output_paths(cfg: TrainConfig) -> dict[str, Path]:
    """Where the run `cfg` writes (`run_files` of its `out_dir` and `run_name`)."""
    return run_files(cfg.out_dir, cfg.run_name)
