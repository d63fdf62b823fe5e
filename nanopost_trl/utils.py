"""Small helpers shared across the package."""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from pathlib import Path
from typing import Any


def make_dataclass(cls: type, overrides: dict[str, Any]) -> Any:
    """`cls(**overrides)`, but an unknown field raises a TypeError naming the closest valid field and all of them."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{cls.__name__} has no field {key!r}{hint}; valid fields: {', '.join(fields)}")
    return cls(**overrides)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a run log in file order. A line that is not a JSON object with a `step` (e.g. one cut off by a kill
    mid-write) is skipped with a warning naming it."""
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{lineno}: skipping corrupt line ({e})", stacklevel=2)
                continue
            if not isinstance(row, dict) or "step" not in row:
                warnings.warn(f"{path}:{lineno}: skipping line without a 'step' field", stacklevel=2)
                continue
            rows.append(row)
    return rows


def text_of(value: str | list[dict[str, Any]]) -> str:
    """The text of a prompt or completion: itself, or a chat's last message's content (TRL's conversational form)."""
    return value if isinstance(value, str) else value[-1]["content"]
