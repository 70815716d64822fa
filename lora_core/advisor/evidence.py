"""The advisor's evidence, read from `evidence.toml`: claims with their numbers, conditions and sources.

Code holds the rules; the data file holds what the rules stand on. A rule reads a number with
`Evidence.number(claim, key)`, which records where the number came from, so every figure the
advisor shows can be traced back to a claim (or to the engine that computed it).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.errors import InputError, is_number

EVIDENCE_FILE = Path(__file__).with_name("evidence.toml")
TASKS = {
    "sft": "instruction SFT",
    "domain": "domain adaptation (continued pretraining)",
    "classification": "classification",
    "preference": "preference / RL",
}
READS = {
    "primary": "the source itself was read",
    "abstract": "only the paper's abstract was read",
    "secondary": "read through a summary or a mirror, not the source itself",
    "article": "the article this app follows; no experiment behind it",
    "app": "measured by this app",
    "convention": "this app's convention: no source measured it",
}
SCOPE_KEYS = {"params_b", "tasks", "examples"}
Number = float | int | tuple[float, ...]


class EvidenceError(InputError):
    """An evidence file the advisor cannot stand on; the message names the claim and the field."""


@dataclass(frozen=True)
class Claim:
    """One claim: `says` in a sentence, `read` (a key of READS), its source and stable `ref`,
    the `conditions` it was measured under (in words, and as numbers in `scope`), and `numbers`.
    A claim may carry a table: `lr_by_model` (the cookbook's learning rates) or `cells` (this app's
    dropout study, one row per (rank, samples))."""

    id: str
    says: str
    read: str
    source: str
    ref: str
    conditions: str
    scope: dict[str, Any]
    numbers: dict[str, Number]
    lr_by_model: tuple[dict[str, Any], ...] = ()
    cells: tuple[dict[str, Any], ...] = ()

    def number(self, key: str) -> Number:
        if key not in self.numbers:
            raise KeyError(f"claim {self.id!r} has no number {key!r}")
        return self.numbers[key]


@dataclass(frozen=True)
class Evidence:
    claims: dict[str, Claim]

    def __getitem__(self, claim_id: str) -> Claim:
        return self.claims[claim_id]

    def number(self, claim_id: str, key: str) -> Number:
        return self.claims[claim_id].number(key)

    def all_numbers(self) -> set[float]:
        """Every number in the file, flattened: what a figure shown may be when it is not the engine's."""
        found: set[float] = set()
        for claim in self.claims.values():
            for value in claim.numbers.values():
                found.update(value if isinstance(value, tuple) else (value,))
            for row in (*claim.lr_by_model, *claim.cells):
                found.update(v for v in row.values() if isinstance(v, int | float) and not isinstance(v, bool))
        return {float(v) for v in found}


@functools.cache
def load_evidence(path: Path = EVIDENCE_FILE) -> Evidence:
    """The claims in `path`, checked: unique ids, every field present and typed, `read` one of
    READS, scope keys known, numbers finite. Raises `EvidenceError`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise EvidenceError(f"evidence file {path} cannot be read: {error}") from None
    claims: dict[str, Claim] = {}
    for index, raw in enumerate(data.get("claims", [])):
        claim = _claim(raw, index)
        if claim.id in claims:
            raise EvidenceError(f"evidence: claim id {claim.id!r} appears twice")
        claims[claim.id] = claim
    if not claims:
        raise EvidenceError(f"evidence file {path} has no [[claims]]")
    return Evidence(claims)


def _claim(raw: dict[str, Any], index: int) -> Claim:
    where = f"evidence: claim {raw.get('id', f'#{index + 1}')!r}"
    for field in ("id", "says", "read", "source", "ref", "conditions"):
        if not isinstance(raw.get(field), str) or not raw[field].strip():
            raise EvidenceError(f"{where}: `{field}` must be a non-empty string")
    if raw["read"] not in READS:
        raise EvidenceError(f"{where}: `read` must be one of {', '.join(READS)}, got {raw['read']!r}")
    scope = raw.get("scope", {})
    if not isinstance(scope, dict) or set(scope) - SCOPE_KEYS:
        raise EvidenceError(f"{where}: `scope` keys must be among {', '.join(sorted(SCOPE_KEYS))}")
    if set(scope.get("tasks", [])) - set(TASKS):
        raise EvidenceError(f"{where}: scope tasks must be among {', '.join(TASKS)}")
    for key in ("params_b", "examples"):
        bounds = scope.get(key)
        if bounds is not None and not (len(bounds) == 2 and 0 < bounds[0] <= bounds[1]):
            raise EvidenceError(f"{where}: scope `{key}` must be [low, high] with 0 < low <= high")
    numbers: dict[str, Number] = {}
    for key, value in raw.get("numbers", {}).items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(is_number(v) for v in values):
            raise EvidenceError(f"{where}: number `{key}` must be a finite number or a list of them")
        numbers[key] = tuple(values) if isinstance(value, list) else value
    table = tuple(raw.get("lr_by_model", ()))
    for row in table:
        if not (isinstance(row.get("model"), str) and is_number(row.get("lr")) and is_number(row.get("params_b"))):
            raise EvidenceError(f"{where}: every lr_by_model row needs `model`, `lr` and `params_b`")
    cells = tuple(raw.get("cells", ()))
    for row in cells:
        if not all(isinstance(v, bool) or is_number(v) for v in row.values()):
            raise EvidenceError(f"{where}: every cell holds finite numbers or true/false")
    return Claim(
        raw["id"], raw["says"], raw["read"], raw["source"], raw["ref"], raw["conditions"], scope, numbers, table, cells
    )
