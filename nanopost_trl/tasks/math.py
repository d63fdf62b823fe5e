"""MATH competition problems, graded for symbolic equivalence by math-verify (`pip install 'nanopost_trl[math]'`).

Default source: the Hub dataset `DigitalLearningGmbH/MATH-lighteval` (train 7,500 / test 5,000; columns `problem`,
`solution`, `level`, `type`). Offline: `data_dir=` or $NANOPOST_MATH_DIR names a directory in the Hub's layout
(`train.jsonl`/`test.jsonl`, or `data/train-00000-of-00001.parquet`). The reference answer is the `answer` column
when there is one (as in MATH-500), else the last `\\boxed{}` of `solution`.
"""

from __future__ import annotations

from typing import Any

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.custom import from_dataset, load_task_split, require_columns
from nanopost_trl.tasks.graders import boxed_prompt, last_boxed

HUB_ID = "DigitalLearningGmbH/MATH-lighteval"
ENV_VAR = "NANOPOST_MATH_DIR"
SOURCE = f"datasets: {HUB_ID} (offline: --data_dir or ${ENV_VAR})"


def _task_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    answer = row.get("answer") or last_boxed(row.get("solution") or "")
    if not answer:
        raise ValueError(f"math row {index}: no 'answer' and no \\boxed{{}} in column 'solution'")
    return {"prompt": boxed_prompt(row["problem"]) if row["problem"] else None, "final_answer": answer}


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """MATH instances for "train" or "test", from `data_dir`, $NANOPOST_MATH_DIR or the Hub."""
    rows, source = load_task_split("math", split, data_dir, ENV_VAR, HUB_ID, "problem, solution (or answer)")
    answer_column = "answer" if "answer" in rows.column_names else "solution"
    require_columns(rows, ("problem", answer_column), source)
    rows = rows.map(_task_row, with_indices=True)
    return from_dataset(rows, prompt_column="prompt", answer_column="final_answer", grader="math", name="math")
