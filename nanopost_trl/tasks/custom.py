"""Tasks from your own data: `from_dataset(source, prompt_column=..., answer_column=..., grader=...)`.

`load_rows` is the one loader every dataset-backed task uses: a `datasets.Dataset`, a local .jsonl/.json/.parquet
file, a local directory in a Hub dataset's layout, or a Hub dataset id, all through `datasets.load_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.graders import GRADERS, AnswerGrader, extract_number, require_math_verify

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix -> datasets builder


def _builder(files: list[Path]) -> str:
    builders = {BUILDERS.get(file.suffix) for file in files}
    if None in builders or len(builders) != 1:
        raise ValueError(f"expected files of one type among {sorted(BUILDERS)}, got {[str(f) for f in files]}")
    return builders.pop()


def split_files(directory: Path, split: str, config: str | None = None) -> list[Path]:
    """Files of `split` at any depth under `directory/config` if it has some, else under `directory`, named like the
    Hub's: `train.jsonl`, `test.parquet`, `main/train-00000-of-00001.parquet`, `data/test-00000-of-00002.parquet`."""
    for root in ([directory / config] if config else []) + [directory]:
        files = sorted(
            path
            for path in root.rglob(f"{split}*")
            if path.suffix in BUILDERS and path.is_file() and path.name[len(split)] in "-._"
        )
        if files:
            return files
    raise FileNotFoundError(
        f"no {split!r} files in {directory}: expected e.g. {split}.jsonl or {split}-00000-of-00001.parquet"
    )


class HubDataUnavailable(ConnectionError):
    """A Hub dataset could not be loaded (offline, unreachable, or no such dataset); the message says what to do."""


LOCAL_DATA_HINT = "pass a local .jsonl/.json/.parquet file, or a directory in the Hub dataset's layout, instead"


def load_rows(
    source: datasets.Dataset | str | os.PathLike,
    split: str,
    config: str | None = None,
    offline_hint: str = LOCAL_DATA_HINT,
) -> datasets.Dataset:
    """The rows of `split` from a Dataset (returned as is), a local file (all of it), a local directory (the files
    `split_files` finds), or a Hub dataset id with an optional `config`. A `Path` must exist locally. A Hub id that
    cannot be loaded raises `HubDataUnavailable`: one line saying what failed, then `offline_hint`."""
    if isinstance(source, datasets.Dataset):
        return source
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else split_files(path, split, config)
        if empty := [file for file in files if file.stat().st_size == 0]:
            raise ValueError(f"the data file {empty[0]} is empty (no rows)")
        data_files = {split: [str(file) for file in files]}
        return datasets.load_dataset(_builder(files), data_files=data_files, split=split)
    if isinstance(source, os.PathLike):
        raise FileNotFoundError(f"{source} does not exist")
    try:
        return datasets.load_dataset(str(source), config, split=split)
    except (ConnectionError, DatasetNotFoundError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubDataUnavailable(
            f"could not load the dataset {str(source)!r} from the Hugging Face Hub ({reason}); {offline_hint}"
        ) from None


def load_task_split(
    name: str,
    split: str,
    data_dir: str | None,
    env_var: str,
    hub_id: str,
    columns: str,
    config: str | None = None,
) -> tuple[datasets.Dataset, Path | str]:
    """A task's "train" or "test" rows from `data_dir`, else $`env_var`, else the Hub; and where they came from.
    `columns` (e.g. "question, answer") is named in the error that says how to run offline."""
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits ('train', 'test'), not {split!r}")
    local_dir = data_dir or os.environ.get(env_var)
    source = Path(local_dir) if local_dir else hub_id
    shard = f"{config}/" if config else ""
    offline_hint = (
        f"to train on {name} offline, pass --data_dir DIR (TrainConfig.data_dir) or set {env_var}=DIR, where DIR "
        f"holds train.jsonl and test.jsonl (or {shard}train-00000-of-00001.parquet and {shard}test-00000-of-00001"
        f".parquet) with columns {columns}"
    )
    return load_rows(source, split, config=config, offline_hint=offline_hint), source


def require_columns(rows: datasets.Dataset, columns: tuple[str, ...], source: object) -> None:
    """Raise a ValueError naming the first of `columns` that `rows` lacks."""
    for column in columns:
        if column not in rows.column_names:
            raise ValueError(f"row 0: no column {column!r} in {source!r}; columns: {rows.column_names}")


def _resolve_grader(grader: str | Callable[[str, Any], float]) -> Callable[[str, Any], float]:
    if callable(grader):
        return grader
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; valid: {', '.join(GRADERS)} or a callable(completion, answer)")
    if grader == "math":
        require_math_verify()  # fail now, not on the first completion; also keeps the import out of the time limit
    return GRADERS[grader]


def from_dataset(
    source: datasets.Dataset | str | os.PathLike,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    grader: str | Callable[[str, Any], float] = "numeric",
    name: str = "custom",
    split: str = "train",
) -> list[TaskInstance]:
    """One TaskInstance per row: the prompt is used verbatim (a string becomes one user chat message; a list of chat
    messages is kept), graded against the row's answer by `grader`: "numeric", "exact", "math" (see
    `tasks.graders`) or any `callable(completion, answer) -> float`, which receives the answer as stored.

    `source`: a `datasets.Dataset`, a Hub dataset id (its `split`), or a local .jsonl/.json/.parquet file (all rows;
    `split` is ignored). A missing column, an empty prompt or a None answer raises a ValueError naming row and column.
    """
    grade = _resolve_grader(grader)
    rows = load_rows(source, split)
    require_columns(rows, (prompt_column, answer_column), source)
    instances = []
    for index, (prompt, answer) in enumerate(zip(rows[prompt_column], rows[answer_column], strict=True)):
        if not isinstance(prompt, str | list) or not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError(f"row {index}: empty or invalid prompt in {prompt_column!r}: {prompt!r}")
        if answer is None:
            raise ValueError(f"row {index}: answer is None in column {answer_column!r}")
        if not callable(grader):
            answer = str(answer)
            if grader == "numeric" and extract_number(answer) is None:
                raise ValueError(f"row {index}: answer {answer!r} in column {answer_column!r} is not a number")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        instances.append(TaskInstance(name=name, prompt=messages, eval_fn=AnswerGrader(grade, answer)))
    return instances
