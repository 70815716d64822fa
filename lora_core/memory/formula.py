"""Numbers that carry their own formula: every memory term is built from labelled quantities, so
the bytes and the text a user reads come from the same values and cannot drift apart.

A `Formula` is an arithmetic expression over labelled numbers (`4,096 tokens x 4,096 hidden x
2 B`). Operators are ` + `, ` - `, ` x ` and ` / ` between spaces; a label is words after a number;
a parenthesised group with no number in it is a note. Evaluating the text with the usual
precedence gives the value (tests/test_memory.py does exactly that for every term).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_SUM, _PRODUCT, _ATOM = 1, 2, 3


@dataclass(frozen=True)
class Formula:
    """A value and the text that computes it; `rank` is how tightly the text binds (a sum, a
    product or a single number), so combining two formulas adds only the brackets it needs."""

    value: int | float
    text: str
    rank: int = _ATOM

    def __add__(self, other: Formula | int) -> Formula:
        other = _as_formula(other)
        return Formula(self.value + other.value, f"{self._operand(_SUM)} + {other._right(_SUM)}", _SUM)

    def __sub__(self, other: Formula | int) -> Formula:
        other = _as_formula(other)
        return Formula(self.value - other.value, f"{self._operand(_SUM)} - {other._right(_SUM)}", _SUM)

    def __mul__(self, other: Formula | int) -> Formula:
        other = _as_formula(other)
        return Formula(self.value * other.value, f"{self._operand(_PRODUCT)} x {other._right(_PRODUCT)}", _PRODUCT)

    def __rmul__(self, other: int) -> Formula:
        return _as_formula(other) * self

    def __truediv__(self, other: Formula | int) -> Formula:
        other = _as_formula(other)
        return Formula(self.value / other.value, f"{self._operand(_PRODUCT)} / {other._right(_PRODUCT)}", _PRODUCT)

    def note(self, text: str) -> Formula:
        """The same value with a note in brackets after it (the note may hold no number)."""
        return Formula(self.value, f"{self._operand(_ATOM)} ({text})", _ATOM)

    def whole(self) -> Formula:
        """Rounded down to whole bytes; the text keeps the exact expression."""
        return Formula(int(self.value), self.text, self.rank)

    def _operand(self, rank: int) -> str:
        return f"({self.text})" if self.rank < rank else self.text

    def _right(self, rank: int) -> str:
        # the right operand of an operator of the same rank keeps its brackets: a - (b + c),
        # and a x (b x c) evaluates in the order the value was computed
        return f"({self.text})" if self.rank <= rank else self.text


def qty(value: int | float, label: str = "") -> Formula:
    """One number with its label: `qty(4096, "hidden")` reads "4,096 hidden"."""
    number = f"{value:,}"
    return Formula(value, f"{number} {label}" if label else number)


def total(parts: Iterable[Formula], empty: str = "B") -> Formula:
    """The sum of `parts` in order; zero bytes when there are none."""
    result = None
    for part in parts:
        result = part if result is None else result + part
    return result if result is not None else qty(0, empty)


def counted(parts: Iterable[Formula], unit: str) -> list[Formula]:
    """`parts` with equal texts folded into one: "3 `unit` x (...)", in first-seen order."""
    counts: dict[str, int] = {}
    first: dict[str, Formula] = {}
    for part in parts:
        counts[part.text] = counts.get(part.text, 0) + 1
        first.setdefault(part.text, part)
    return [first[text] if n == 1 else qty(n, unit) * first[text] for text, n in counts.items()]


def _as_formula(value: Formula | int) -> Formula:
    return value if isinstance(value, Formula) else qty(value)
