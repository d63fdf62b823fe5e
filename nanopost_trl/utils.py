"""Small helpers shared across the package."""

from __future__ import annotations

import dataclasses
import difflib
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
