"""Answer graders shared by the tasks, by name in GRADERS: `numeric`, `exact`, `math`; `grade(completion, answer)`.

They read model text only: nothing in a completion is ever evaluated as code. `numeric` and `exact` are linear scans
(numbers capped in length); `math` runs sympy and relies on `rewards.safe_grade`'s timeout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from fractions import Fraction
from types import ModuleType
from typing import Any

from nanopost_trl.base import Prompt

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BOXED_PATTERN = r"\\boxed\{\s*[^\s}]"  # for `rewards.Format`: a non-empty `\boxed{` (linear time to search)

MAX_NUMBER_CHARS = 100  # longer digit strings are not answers (and int() refuses > 4300 digits anyway)
_INT = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"  # 1,234,567 or 1234567 (ASCII digits only)
NUMBER = re.compile(rf"-?{_INT}(?:\.[0-9]+)?(?:/{_INT})?")  # -12, 1,234.50, 3/4
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[0-9.,]+)\s*\}\{\s*([0-9.,]+)\s*\}")  # \frac{3}{4} -> 3/4
_LATEX_NOISE = re.compile(r"\\[!,;: ]|\\\$|\\%|\{,\}")  # thin spaces, \$, \%, 1{,}000


def boxed_prompt(question: str) -> Prompt:
    """The chat prompt of the built-in math tasks: the question, then the reasoning + `\\boxed{}` instruction."""
    return [{"role": "user", "content": f"{question}\n\n{BOXED_INSTRUCTION}"}]


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces allowed), or None if there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
    return None


def after_marker(text: str, marker: str = "####") -> str | None:
    """The rest of the line after the last `marker` (GSM8K's `#### 42`), or None without one."""
    _, found, rest = text.rpartition(marker)
    return rest.strip().split("\n", 1)[0] if found else None


def parse_number(token: str) -> Fraction | None:
    """A NUMBER match as an exact Fraction ("1,234.50" -> 2469/2, "3/4" -> 3/4); None if too long or x/0."""
    if len(token) > MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(token.replace(",", ""))
    except ZeroDivisionError:
        return None


def extract_number(completion: str) -> Fraction | None:
    """The final numeric answer: the first number after the last `####`, else in the last `\\boxed{}`, else the last
    number in the text. Understands commas, `$`, `%`, decimals, negatives, `a/b` and `\\frac{a}{b}`."""
    text = _LATEX_NOISE.sub("", _FRAC.sub(r"\1/\2", completion.replace("\u2212", "-")))
    for segment in (after_marker(text), last_boxed(text)):
        match = NUMBER.search(segment) if segment else None
        if match:
            return parse_number(match.group())
    numbers = NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def grade_numeric(completion: str, answer: str) -> float:
    """1.0 if the completion's final number equals `answer` exactly as rationals (0.75 == 3/4 == 75/100)."""
    gold = extract_number(answer)
    if gold is None:
        raise ValueError(f"answer {answer!r} is not a number")
    return float(extract_number(completion) == gold)


def grade_exact(completion: str, answer: str) -> float:
    """1.0 if the final answer string (after `####`, else in the last `\\boxed{}`, else the last non-empty line)
    equals `answer`, both stripped of surrounding whitespace."""
    final = after_marker(completion)
    if final is None:
        final = last_boxed(completion)
    if final is None:
        lines = [line for line in completion.splitlines() if line.strip()]
        final = lines[-1] if lines else ""
    return float(final.strip() == answer.strip())


def require_math_verify() -> ModuleType:
    """Import math-verify (the optional `math` extra) or raise an ImportError saying how to install it."""
    try:
        import math_verify
    except ImportError as error:
        raise ImportError("the 'math' grader needs math-verify: pip install 'nanopost_trl[math]'") from error
    return math_verify


def grade_math(completion: str, answer: str) -> float:
    """1.0 if math-verify finds the completion's LaTeX answer (`\\boxed{}` first, else `$...$`) symbolically equal to
    the LaTeX `answer` (`\\frac{1}{2}` == 0.5 == `\\frac{2}{4}`).

    Only LaTeX is extracted: math-verify's plain-text path goes through sympy's eval-based `parse_expr`, so it is off
    and model text never reaches `eval`. math-verify's own signal.alarm timeouts are off too (they would cancel
    `safe_grade`'s timer, and raise outside the main thread): run this grader under `rewards.safe_grade`.
    """
    math_verify = require_math_verify()
    latex_only = [math_verify.LatexExtractionConfig()]
    gold = math_verify.parse(f"\\boxed{{{answer}}}", extraction_config=latex_only, parsing_timeout=None)
    prediction = math_verify.parse(completion, extraction_config=latex_only, parsing_timeout=None)
    return float(math_verify.verify(gold, prediction, timeout_seconds=None))


GRADERS: dict[str, Callable[[str, str], float]] = {"numeric": grade_numeric, "exact": grade_exact, "math": grade_math}


@dataclasses.dataclass(frozen=True)
class AnswerGrader:
    """A TaskInstance's `eval_fn`: `grade(completion, answer)` with the instance's reference answer bound."""

    grade: Callable[[str, Any], float]
    answer: Any

    def __call__(self, completion: str) -> float:
        return self.grade(completion, self.answer)
