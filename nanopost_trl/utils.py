"""Small helpers shared across the package: dataclass fields typed from text (`convert_field`, `make_dataclass`: the
CLI's flags, `--loss_args`, YAML) with a close-match hint for a misspelt name; a JSONL log read back whole
(`read_rows`); the text of a prompt or a chat (`text_of`)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

# How alike an unknown name and a known one must be (difflib's ratio) to be suggested: a typo of one or two letters
# (num_stepz, etta) clears it; num_generations vs num_iterations (0.83), a field of another meaning, does not.
HINT_CUTOFF = 0.85
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def close_match(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate most like `name`, if any is alike above `HINT_CUTOFF`."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=HINT_CUTOFF)
    return matches[0] if matches else None


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as type `annotation` (bool, int, float, str, Literal, unions incl. Optional); a ValueError if it is
    not one. Strings are parsed (command lines and YAML give strings); other annotations pass `value` unchanged."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arm in args:
            try:
                return _convert(value, arm)
            except ValueError:
                pass
        raise ValueError
    if origin is Literal:
        if value not in args:
            raise ValueError
        return value
    if annotation is type(None):
        raise ValueError
    if annotation is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ValueError
        return value
    if annotation is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if annotation in (int, float, str) and (isinstance(value, bool) or not isinstance(value, int | float | str)):
        raise ValueError
    if annotation is float:
        return float(value)
    if annotation is int:
        if isinstance(value, int):
            return value
        if not float(value).is_integer():
            raise ValueError  # 2.5 is not an int
        return int(float(value))
    if annotation is str:
        return str(value)
    return value


def type_name(annotation: Any) -> str:
    """`float | None`, `one of 'token', 'sequence'`: how an error names the expected type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass `cls`; none when they cannot be resolved (e.g. names only imported
    for type checking)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def convert_field(cls: type, name: str, value: Any) -> Any:
    """`value` converted to the type of dataclass `cls`'s field `name`; a TypeError names the field, the value and
    the expected type. Fields whose annotation cannot be resolved pass unchanged."""
    annotation = _field_types(cls).get(name, Any)
    try:
        return _convert(value, annotation)
    except (ValueError, TypeError):
        raise TypeError(f"{cls.__name__}.{name}={value!r}: expected {type_name(annotation)}") from None


def make_dataclass(cls: type, overrides: dict[str, Any]) -> Any:
    """`cls(**overrides)` with each value checked and converted to its field's type (`convert_field`); an unknown
    field raises a TypeError naming the closest valid field and all of them."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in fields:
            close = close_match(key, fields)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise TypeError(f"{cls.__name__} has no field {key!r}{hint}; valid fields: {', '.join(fields)}")
    return cls(**{key: convert_field(cls, key, value) for key, value in overrides.items()})


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


def text_of(value: str | list[dict[str, Any]], role: str | None = None) -> str:
    """The text of a prompt or completion: itself, or the content of a chat's last message (of `role`, if given;
    "" when there is none): TRL's conversational form, a multi-turn episode's final assistant reply."""
    if isinstance(value, str):
        return value
    messages = [message for message in value if role is None or message["role"] == role]
    return messages[-1]["content"] if messages else ""
