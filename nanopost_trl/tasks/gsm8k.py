"""GSM8K grade-school math word problems (`openai/gsm8k`, config "main"): train split to train, test to evaluate.

Offline: `data_dir=` or $NANOPOST_GSM8K_DIR names a directory in the Hub's layout (`train.jsonl`/`test.jsonl`, or
`main/train-00000-of-00001.parquet`) with columns `question` and `answer` (a worked solution ending in `#### N`).
The model is asked to reason, then box its answer; `graders.grade_numeric` reads `####`, `\\boxed{}` or the last
number, and compares exactly as a rational.
"""

from __future__ import annotations

from typing import Any

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.custom import from_dataset, load_task_split, require_columns
from nanopost_trl.tasks.graders import after_marker, boxed_prompt

HUB_ID = "openai/gsm8k"
CONFIG = "main"
ENV_VAR = "NANOPOST_GSM8K_DIR"
SOURCE = f"datasets: {HUB_ID} (offline: --data_dir or ${ENV_VAR})"


def _task_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    answer = after_marker(row["answer"] or "")
    if not answer:
        raise ValueError(f"gsm8k row {index}: column 'answer' has no '#### <number>' line: {row['answer']!r}")
    return {"prompt": boxed_prompt(row["question"]) if row["question"] else None, "final_answer": answer}


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """GSM8K instances for "train" or "test", from `data_dir`, $NANOPOST_GSM8K_DIR or the Hub."""
    rows, source = load_task_split("gsm8k", split, data_dir, ENV_VAR, HUB_ID, "question, answer", config=CONFIG)
    require_columns(rows, ("question", "answer"), source)
    rows = rows.map(_task_row, with_indices=True)
    return from_dataset(rows, prompt_column="prompt", answer_column="final_answer", grader="numeric", name="gsm8k")
