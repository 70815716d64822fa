"""How much of its configured rank an adapter uses, by module type, by depth and overall."""

from __future__ import annotations

from typing import Literal

import pandas as pd

from lora_core.inspect.spectra import Inspection, energy_column

HEATMAP_VALUES = ("rank_used", "entropy_rank", "norm")


def usage(inspection: Inspection, by: Literal["type", "layer"]) -> pd.DataFrame:
    """One row per module type (or layer): `updates`, mean `r`, mean `entropy_rank`, mean
    `rank_<p>` per energy, `used_<p>` = sum of rank_<p> / sum of r (the share of the configured
    rank that holds p of the energy), and `norm` (root of the summed squared norms)."""
    frame = inspection.modules
    columns = [energy_column(p) for p in inspection.energies]
    if frame.empty:
        return pd.DataFrame(columns=[by, "updates", "r", "entropy_rank", *columns, "norm"])
    grouped = frame.groupby(by, sort=True)
    table = grouped.agg(updates=("name", "size"), r=("r", "mean"), entropy_rank=("entropy_rank", "mean"))
    for column in columns:
        table[column] = grouped[column].mean()
        table["used_" + column.removeprefix("rank_")] = grouped[column].sum() / grouped["r"].sum()
    table["norm"] = grouped["norm"].apply(lambda n: float((n**2).sum() ** 0.5))
    return table.reset_index()


def overall(inspection: Inspection) -> dict[str, float]:
    """`updates`, `configured_rank` (summed r), and per energy p the summed `rank_<p>` and
    `used_<p>` (their share of the configured rank)."""
    frame = inspection.modules
    total = int(frame["r"].sum()) if not frame.empty else 0
    result: dict[str, float] = {"updates": len(frame), "configured_rank": total}
    for energy in inspection.energies:
        column = energy_column(energy)
        kept = int(frame[column].sum()) if total else 0
        result[column] = kept
        result["used_" + column.removeprefix("rank_")] = kept / total if total else 0.0
    return result


def heatmap(inspection: Inspection, value: str, energy: float | None = None) -> pd.DataFrame:
    """Layers (rows) x module types (columns) of `value`, averaged over experts: `rank_used` is
    rank_<energy> / r, `entropy_rank` and `norm` as they are. Modules outside the layer stack
    (layer -1: embeddings, lm_head) are the row -1."""
    frame = inspection.modules
    if frame.empty:
        return pd.DataFrame()
    if value == "rank_used":
        column = energy_column(energy if energy is not None else inspection.energies[0])
        frame = frame.assign(rank_used=frame[column] / frame["r"])
    elif value not in frame.columns:
        raise ValueError(f"`value` must be one of {', '.join(HEATMAP_VALUES)}, got {value!r}")
    return frame.pivot_table(index="layer", columns="type", values=value, aggfunc="mean").sort_index()
