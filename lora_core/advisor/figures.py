"""The figures behind the advisor's text: every number it shows goes through a `Ledger`, which
records it as a `Figure` with its origin (a claim's number, the engine, or the user's input), so a
test can check with `numbers_in` that nothing shown is made up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lora_core.advisor.evidence import Evidence


@dataclass(frozen=True)
class Figure:
    """A number as shown (`text`), its value, and where it comes from: "claim:<id>:<key>",
    "table:<id>:<model>" (a row of a claim's table), "scope:<id>:<key>", "engine:<what>" or
    "input:<field>"."""

    text: str
    value: float
    origin: str


def show(value: float) -> str:
    """How the advisor writes a number: whole numbers with thousands separators, learning rates
    as 3e-4, everything else with up to 3 significant digits."""
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def show_ratio(factor: float) -> str:
    """How the advisor writes a ratio: whole above 100, as `show` below 0.01, else 3 significant digits."""
    if factor >= 100:
        return f"{round(factor):,}"
    return show(factor) if factor < 0.01 else f"{factor:.3g}"


@dataclass
class Ledger:
    """The figures behind the text being written: every number goes through here."""

    evidence: Evidence
    figures: list[Figure] = field(default_factory=list)

    def _add(self, value: float, origin: str, text: str | None = None) -> str:
        text = text if text is not None else show(value)
        self.figures.append(Figure(text, float(value), origin))
        return text

    def claim(self, claim_id: str, key: str) -> str:
        value = self.evidence.number(claim_id, key)
        if isinstance(value, tuple):
            raise TypeError(f"{claim_id}.{key} is a list; use claim_list")
        return self._add(value, f"claim:{claim_id}:{key}")

    def claim_value(self, claim_id: str, key: str) -> float:
        value = self.evidence.number(claim_id, key)
        assert not isinstance(value, tuple)
        return float(value)

    def claim_list(self, claim_id: str, key: str) -> tuple[float, ...]:
        value = self.evidence.number(claim_id, key)
        return tuple(float(v) for v in (value if isinstance(value, tuple) else (value,)))

    def listed(self, claim_id: str, key: str, value: float) -> str:
        """A member of a claim's list (a rung of the rank ladder)."""
        assert value in self.claim_list(claim_id, key)
        return self._add(value, f"claim:{claim_id}:{key}")

    def cell(self, claim_id: str, cell: dict[str, Any], key: str) -> str:
        """A number of one cell of a claim's `cells` table."""
        return self._add(cell[key], f"cell:{claim_id}:{cell['rank']}:{cell['samples']}:{key}")

    def cell_percent(self, claim_id: str, cell: dict[str, Any], key: str) -> str:
        """A fraction in one cell of a claim's `cells` table, shown as a percentage."""
        value = 100 * cell[key]
        return self._add(value, f"cellpct:{claim_id}:{cell['rank']}:{cell['samples']}:{key}", f"{value:.3g}")

    def table(self, claim_id: str, row: dict[str, Any], key: str) -> str:
        return self._add(row[key], f"table:{claim_id}:{row['model']}:{key}")

    def scope(self, claim_id: str, key: str, value: float) -> str:
        return self._add(value, f"scope:{claim_id}:{key}")

    def engine(self, value: float, what: str, text: str | None = None) -> str:
        return self._add(value, f"engine:{what}", text)

    def given(self, value: float, name: str) -> str:
        return self._add(value, f"input:{name}")


_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?")


def numbers_in(text: str) -> list[str]:
    """The numbers written in `text` (what a test checks against the figures)."""
    return _NUMBER.findall(text)
