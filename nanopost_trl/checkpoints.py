"""Checkpoints and the final model written whole or not at all, and checked before a resume trusts them.

A save writes into `{out_dir}/.saving/{run_name}/{name}`; once every process has written its part, the weights are
opened, each file's size and sha256 go to `manifest.json`, and the directory is renamed to `{out_dir}/{run_name}/{name}`
(one rename: a reader sees the whole checkpoint or none). A full disk or a refused write stops the run with
`DiskError` (one line: the path, the space needed and free) and leaves the earlier checkpoints as they were.
`resume_point` returns the newest checkpoint whose files still match their manifest, naming the ones it skips.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STAGING = ".saving"  # {out_dir}/.saving/{run_name}/{name}: a save in progress, never read
PREFIX = "checkpoint-"
# errno -> what to call it; a write that fails with one of these stops the run in one line
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
# how libraries that do not raise OSError word the same failures (safetensors' Rust I/O error, torch's stream writer)
DISK_ERROR_WORDS = {
    errno.ENOSPC: ("No space left on device", "StorageFull", "os error 28", "file write failed"),
    errno.EACCES: ("Permission denied", "os error 13"),
    errno.EROFS: ("Read-only file system", "os error 30"),
}


class DiskError(RuntimeError):
    """A write the run needs failed for lack of space or permission; the message is one line."""


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(PREFIX))


def sha256(path: Path, sync: bool = False) -> str:
    """The file's sha256; with `sync`, its data flushed to the disk too."""
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {"bytes": size, "sha256": digest}} of the files `names` (relative to `directory`), each fsynced."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name, sync=True)}
        for name in names
    }


def data_files(directory: Path) -> list[str]:
    """The files under `directory` a manifest covers (all but the manifest), relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def check_weights_load(directory: Path) -> None:
    """Open every safetensors file and read each tensor's header entry: a cut-off or garbled file raises."""
    from safetensors import safe_open

    for path in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                weights.get_slice(key)


def write_manifest(directory: Path, records: dict[str, dict[str, Any]]) -> None:
    """`manifest.json` with each file's size and sha256, written and fsynced last."""
    with open(directory / MANIFEST, "w") as f:
        json.dump({"files": records}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(directory: Path, checksums: bool = True) -> str | None:
    """None when `directory` holds every file its manifest lists, at the recorded size (and, with `checksums`, the
    recorded sha256); else why not, in a few words."""
    try:
        records = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (not saved whole by nanopost_trl)"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {record['bytes']}"
        if checksums and sha256(path) != record["sha256"]:
            return f"{name} does not match its sha256"
    return None


def resume_point(directory: Path, checksums: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest `checkpoint-N` in `directory` that passes `verify`, or None; the newer ones it skipped, each with
    why)."""
    candidates = [p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and p.name.removeprefix(PREFIX).isdigit()]
    skipped = []
    for checkpoint in sorted(candidates, key=step_of, reverse=True):
        problem = verify(checkpoint, checksums)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def latest_checkpoint(directory: Path, checksums: bool = False) -> Path | None:
    """The newest complete `checkpoint-N` in `directory` (`resume_point`; by file sizes unless `checksums`)."""
    return resume_point(directory, checksums)[0]


def disk_error_kind(error: BaseException) -> int | None:
    """The errno of `DISK_ERRORS` behind `error` (or an exception it was raised from), if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return error.errno
        for kind, words in DISK_ERROR_WORDS.items():
            if any(word in str(error) for word in words):
                return kind
        error = error.__cause__ or error.__context__
    return None


def disk_error_message(kind: int, path: Path, needed_bytes: int | None) -> str:
    """'cannot write PATH: no space left on device (needs about X GB, Y GB free)' and the like."""
    free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    space = f" (needs about {needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free)" if needed_bytes else ""
    return f"cannot write {path}: {DISK_ERRORS[kind]}{space}"


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def save_atomically(
    accelerator, target: Path, write: Callable[[Path], None], needed_bytes: Callable[[], int | None]
) -> None:
    """`write(staging_dir)` on every process, then (main process) the weights opened, the manifest written and the
    staging directory renamed to `target`, replacing an older one. A disk error on any process: the staging
    directory is removed and every process raises the same one-line `DiskError` naming `target`.

    `needed_bytes()`: the expected size of the save, for the message.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    staging = staging_dir(target)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    accelerator.wait_for_everyone()
    problems = [_disk_error(lambda: write(staging), target, needed_bytes)]
    problems = [p for p in gather_object(problems) if p]
    # each process checksums a share of the files (on a shared file system), so no process waits for all of them
    names = data_files(staging) if not problems else []
    share = names[accelerator.process_index :: accelerator.num_processes]
    records = {} if problems else _merged(gather_object([file_records(staging, share)]))
    if accelerator.is_main_process and not problems:
        problem = _disk_error(lambda: _commit(staging, target, records), target, needed_bytes)
        problems = [problem] if problem else []
    problems = broadcast_object_list([problems])[0]
    if problems:
        if accelerator.is_main_process:
            _remove_staging(staging)
        raise DiskError(problems[0])


def staging_dir(target: Path) -> Path:
    """Where a save of `target` ({out_dir}/{run_name}/{name}) is written first: {out_dir}/.saving/{run_name}/{name}."""
    return target.parent.parent / STAGING / target.parent.name / target.name


def _merged(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: record for part in records for name, record in part.items()}


def _disk_error(action: Callable[[], None], target: Path, needed_bytes: Callable[[], int | None]) -> str | None:
    """Run `action`; a disk error -> its one-line message (other errors propagate)."""
    try:
        action()
    except Exception as error:
        kind = disk_error_kind(error)
        if kind is None:
            raise
        return disk_error_message(kind, target, needed_bytes())
    return None


def _commit(staging: Path, target: Path, records: dict[str, Any]) -> None:
    check_weights_load(staging)
    write_manifest(staging, records)
    replaced = staging.with_name(f"{target.name}.replaced")
    if target.exists():  # e.g. a checkpoint that failed verification, saved again after resuming before it
        target.rename(replaced)
    staging.rename(target)
    _fsync_directory(target.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    for path in staging.parent.iterdir():  # what the writer put beside the checkpoint (TRL's model card) goes beside it
        if path.is_file():
            os.replace(path, target.parent / path.name)
    _remove_staging(staging)


def _remove_staging(staging: Path) -> None:
    """Remove the run's staging directory, and `.saving` once no run is saving."""
    shutil.rmtree(staging.parent, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.parent.rmdir()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(trainer, save: Callable[[], None]) -> None:
    """transformers' `_save_checkpoint` (`save`, which writes `{args.output_dir}/checkpoint-{step}`) made atomic: for
    the call, `args.output_dir` is the staging directory's parent (named like the run directory, as TRL's model card
    reads it)."""
    run_dir = Path(trainer.args.output_dir)

    def write(staging: Path) -> None:
        trainer.args.output_dir = str(staging.parent)
        try:
            save()
        finally:
            trainer.args.output_dir = str(run_dir)

    target = run_dir / f"{PREFIX}{trainer.state.global_step}"
    save_atomically(trainer.accelerator, target, write, lambda: expected_bytes(trainer, optimizer=True))


def expected_bytes(trainer, optimizer: bool) -> int:
    """About how many bytes a save takes: the previous checkpoint's size, else the saved weights (the trainable ones
    under LoRA) plus, for a checkpoint (`optimizer`), AdamW's two fp32 moments of each trainable weight."""
    previous = latest_checkpoint(Path(trainer.args.output_dir))
    if optimizer and previous is not None:
        return directory_bytes(previous)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = trainable if hasattr(model, "peft_config") else list(model.parameters())
    adam_moments = 8 * sum(p.numel() for p in trainable) if optimizer else 0
    return sum(p.numel() * p.element_size() for p in saved) + adam_moments
