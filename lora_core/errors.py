"""The engine's one error type for input a user can fix.

Every message is one line that says what to change. Callers (the CLI, the pages) catch
`InputError` and nothing broader: any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


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
