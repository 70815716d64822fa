"""Reading the dropout study's results: the per-(rank, samples) table, the article's claims checked
against it, and the compact summary the advisor's evidence file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from lora_core.dropout_study.batched import run_dropout_study
from lora_core.dropout_study.study import DEFAULT_STUDY
from lora_core.errors import InputError

GAIN_FLOOR = 0.01  # a relative change below 1% is reported as no effect, whatever the seeds say
Verdict = Literal["holds", "partly", "does not hold", "untested"]
LOW_RANK = 4  # the article: "very low ranks (<= 4) work fine without dropout"
ARTICLE_RATES = (0.05, 0.1)  # the article's rates for small data sets


def dropout_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, samples), from the curves' last step: `loss_at_0` and `loss_at_best` (held-out,
    mean over seeds), `best_rate` (the rate with the lowest mean, 0 included), `gain` (relative drop
    from p=0 to the best), `seed_spread` (the larger max-min over seeds of the two losses),
    `wins` (seeds where the best rate beat 0) and `clear`: the drop exceeds the seed spread and
    GAIN_FLOOR. Raises InputError when the curves lack dropout 0 or a rank/samples/seed column."""
    needed = {"rank", "samples", "dropout", "seed", "step", "heldout_loss"}
    if missing := needed - set(curves.columns):
        raise InputError(f"the study results lack the columns {', '.join(sorted(missing))}")
    if not (curves["dropout"] == 0).any():
        raise InputError("include dropout 0 in the rates: every rate is compared with it")
    final = curves[curves["step"] == curves["step"].max()]
    losses = final.pivot_table(index=["rank", "samples", "seed"], columns="dropout", values="heldout_loss")
    rows = []
    for (rank, samples), cell in losses.groupby(level=["rank", "samples"]):
        means = cell.mean()
        best = float(means.idxmin())
        spread = max(_range(cell[0.0]), _range(cell[best]))
        drop = float(means[0.0] - means[best])
        gain = drop / float(means[0.0])
        rows.append(
            {
                "rank": int(rank),
                "samples": int(samples),
                "best_rate": best,
                "loss_at_0": float(means[0.0]),
                "loss_at_best": float(means[best]),
                "gain": gain,
                "seed_spread": spread,
                "wins": int((cell[best] < cell[0.0]).sum()),
                "clear": bool(best > 0 and drop > spread and gain >= GAIN_FLOOR),
            }
        )
    return pd.DataFrame(rows)


def _range(values: pd.Series) -> float:
    return float(values.max() - values.min())


@dataclass(frozen=True)
class Finding:
    """One of the article's claims, the study's verdict on it and the numbers behind it."""

    claim: str
    verdict: Verdict
    sentence: str


def dropout_findings(table: pd.DataFrame) -> tuple[Finding, ...]:
    """The article's dropout claims checked against `dropout_table`'s cells, every number in the
    sentences read from the table: small data sets benefit (and at which rates), large ones need
    little or none, higher ranks gain more, ranks <= 4 do fine without it."""
    clear = table[table["clear"]]
    return (
        _small_data(table, clear),
        _rates(clear),
        _large_data(table),
        _high_rank(table),
        _low_rank(table),
    )


def _cell(row: pd.Series) -> str:
    return f"rank {row['rank']}, n = {row['samples']:,} (p = {row['best_rate']:g})"


def _small_data(table: pd.DataFrame, clear: pd.DataFrame) -> Finding:
    claim = "smaller data sets benefit from dropout"
    if clear.empty:
        return Finding(
            claim, "does not hold", "Dropout never lowers held-out loss by more than the seed spread and 1%."
        )
    top = clear.loc[clear["gain"].idxmax()]
    largest_n = int(clear["samples"].max())
    verdict: Verdict = "holds" if largest_n < table["samples"].max() else "partly"
    return Finding(
        claim,
        verdict,
        f"Dropout lowers held-out loss by more than the seed spread in {len(clear)} of {len(table)} (rank, n) cells, "
        f"all at n <= {largest_n:,}; most at {_cell(top)}: {top['gain']:.0%} below p = 0.",
    )


def _rates(clear: pd.DataFrame) -> Finding:
    claim = f"the rates that help are {ARTICLE_RATES[0]:g}-{ARTICLE_RATES[1]:g}"
    if clear.empty:
        return Finding(claim, "untested", "No cell gains clearly from dropout, so no rate is best.")
    best = clear["best_rate"]
    inside = best.between(*ARTICLE_RATES)
    verdict: Verdict = "holds" if inside.all() else "partly" if inside.any() else "does not hold"
    return Finding(
        claim,
        verdict,
        f"Where dropout helps clearly, the best rate is p = {best.min():g}-{best.max():g}; "
        f"{int(inside.sum())} of {len(best)} such cells are within the article's {ARTICLE_RATES[0]:g}-{ARTICLE_RATES[1]:g}.",
    )


def _large_data(table: pd.DataFrame) -> Finding:
    claim = "large data sets need little or no dropout"
    sizes = sorted(table["samples"].unique())
    quiet = [n for n in sizes if not table.loc[table["samples"] >= n, "clear"].any()]
    if not quiet:
        return Finding(claim, "does not hold", f"Even at n = {sizes[-1]:,} dropout still helps clearly at some rank.")
    start = quiet[0]
    above = table[table["samples"] >= start]
    change = above.loc[above["gain"].abs().idxmax()]
    verdict: Verdict = "holds" if start > sizes[0] else "partly"
    return Finding(
        claim,
        verdict,
        f"From n = {start:,} on, no rank gains more than the seed spread and 1% from dropout "
        f"(the largest change there: {change['gain']:.1%} at {_cell(change)}).",
    )


def _high_rank(table: pd.DataFrame) -> Finding:
    claim = "higher ranks gain more from dropout"
    gains = table.groupby("rank")["gain"].max()
    if len(gains) < 2:
        return Finding(claim, "untested", "The study has one rank; compare at least two.")
    rising = bool((gains.diff().dropna() >= -GAIN_FLOOR).all()) and gains.iloc[-1] > gains.iloc[0] + GAIN_FLOOR
    verdict: Verdict = "holds" if rising else "partly" if gains.iloc[-1] > gains.iloc[0] else "does not hold"
    listed = ", ".join(f"r = {r}: {g:.0%}" for r, g in gains.items())
    return Finding(claim, verdict, f"The largest gain from dropout at each rank (over n): {listed}.")


def _low_rank(table: pd.DataFrame) -> Finding:
    claim = f"ranks <= {LOW_RANK} work fine without dropout"
    low = table[table["rank"] <= LOW_RANK]
    if low.empty:
        return Finding(claim, "untested", f"The study has no rank <= {LOW_RANK}.")
    helped = low[low["clear"]]
    if helped.empty:
        top = low.loc[low["gain"].idxmax()]
        return Finding(
            claim,
            "holds",
            f"At rank <= {LOW_RANK} dropout never helps by more than the seed spread and 1% "
            f"(at most {top['gain']:.1%}, {_cell(top)}).",
        )
    top = helped.loc[helped["gain"].idxmax()]
    return Finding(
        claim,
        "does not hold",
        f"At rank <= {LOW_RANK} dropout still helps clearly in {len(helped)} of {len(low)} cells, "
        f"at n <= {int(helped['samples'].max()):,}: up to {top['gain']:.0%} at {_cell(top)}.",
    )


def study_summary(device: str = "cpu") -> dict[str, Any]:
    """`DEFAULT_STUDY` run on `device` (the CPU by default: seeded and deterministic there), as a
    compact dict: the study's parameters, one entry per (rank, samples) cell of `dropout_table`
    and the findings."""
    study = DEFAULT_STUDY
    table = dropout_table(run_dropout_study(study, device))
    cells = [
        {key: (round(value, 6) if isinstance(value, float) else value) for key, value in row.items()}
        for row in table.to_dict("records")
    ]
    return {
        "study": {key: (list(v) if isinstance(v, tuple) else v) for key, v in study.__dict__.items()},
        "cells": cells,
        "findings": [finding.__dict__ for finding in dropout_findings(table)],
    }
