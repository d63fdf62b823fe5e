"""Natural-language 2-digit addition for real instruct LLMs: "What is 47 + 38? Answer with just the number."

Generated offline from the operand pairs of the `addition` task (10 <= a, b <= 99, the same seeded disjoint splits:
1000 test pairs, 7100 train), asked as a chat question and graded by the `numeric` grader (the completion's final
number must equal a + b). How often SmolLM2-135M-Instruct answers right before training: benchmarks/RESULTS.md,
"A real instruct LLM on CPU".
"""

from __future__ import annotations

from nanopost_trl.base import TaskInstance
from nanopost_trl.tasks.addition import operand_pairs
from nanopost_trl.tasks.graders import AnswerGrader, grade_numeric

NAME = "arithmetic"
SOURCE = "generated offline (natural-language questions, for real instruct LLMs)"


def question(a: int, b: int) -> str:
    """The user message for a + b."""
    return f"What is {a} + {b}? Answer with just the number."


def load(split: str, data_dir: str | None = None) -> list[TaskInstance]:
    """The instances of `split` ("train": 7100, "test": 1000); `data_dir` is ignored (nothing is downloaded)."""
    return [
        TaskInstance(NAME, [{"role": "user", "content": question(a, b)}], AnswerGrader(grade_numeric, str(a + b)))
        for a, b in operand_pairs(split)
    ]
