"""The engine's one error type for input a user can fix.

Every message is one line that says what to change. Callers (the CLI, the pages) catch
`InputError` and nothing broader: any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import unicodedata
from typing import TypeGuard


class InputError(ValueError):
    """Bad input (a field, a file, a flag, a link value); `str(error)` is one line saying what to fix.

    A subclass of ValueError so code written against the older per-module types keeps working.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """`text` as one line: its first non-empty line, or the type name of an empty exception."""
    if isinstance(text, BaseException):
        body = str(text).strip()
        return body.splitlines()[0].strip() if body else type(text).__name__
    body = str(text).strip()
    return body.splitlines()[0].strip() if body else ""


def short_repr(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, so a huge hostile value keeps a message to one
    readable line."""
    try:
        text = repr(value).replace("\n", " ")
    except (RecursionError, ValueError):  # nested thousands deep; an int too long to print
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (JSON and widgets hand over `True` where a count was meant)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float that is not a bool: what every numeric field of the engine takes."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive_int_problem(name: str, value: object, limit: int | None = None) -> str | None:
    """The one-line problem when `value` is not an integer in 1..`limit` (no upper bound when
    `limit` is None), else None. Every count, size and rank check of the engine says it this way."""
    if is_int(value) and value >= 1 and (limit is None or value <= limit):
        return None
    bound = f" up to {limit:,}" if limit is not None else ""
    return f"`{name}` must be a positive integer{bound}, got {short_repr(value)}"


# A run's or an experiment's name: what a table can show as typed.
MAX_NAME_CHARS = 200


def name_problem(name: str, what: str = "a run name") -> str | None:
    """Why `name` (already stripped) cannot name a run or an experiment, or None: control or
    direction-override characters, or more than MAX_NAME_CHARS characters."""
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in name):
        return f"{what} cannot hold control or direction-override characters: retype it"
    if len(name) > MAX_NAME_CHARS:
        return f"{what} is at most {MAX_NAME_CHARS} characters, this one has {len(name):,}"
    return None
