"""Text a client sent (a link value, a file name) made safe to show back."""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """`text` without control, format (bidi overrides, zero-width) and separator characters."""
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def shorten(text: str, limit: int = 60) -> str:
    """`text` made printable, at most `limit` characters."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
