"""Compare two adapters of one base model: did they learn the same directions?

The measure is the LoRA paper's subspace similarity (Hu et al. 2021, section 7.2):
phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), where U1_i holds the top-i singular directions of the
first update and U2_j the top-j of the second; 1 when one subspace contains the other, about
min(i, j) / d for random ones. The paper takes the right singular vectors of A; here they are the
update's own (scale B A), on the input side (`phi_*`) and the output side (`phi_out_*`), which a
rescaling of B against A cannot change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lora_core.inspect.loading import Adapter, AdapterError
from lora_core.inspect.spectra import (
    Spectrum,
    adapter_modules,
    energy_column,
    factors,
    open_weights,
    rank_measures,
    spectrum,
)

# Directions per side kept for a module's phi(i, j) grid.
GRID_LIMIT = 64


@dataclass(frozen=True)
class Comparison:
    """`modules`: per update both adapters have, `r_first`, `r_second`, `k` (the smaller of their
    90%-energy ranks), `phi_top` (phi(1, 1)), `phi_k` (phi(k, k)), `phi_out_k` (the output side);
    `grids`: each update's phi(i, j) on the input side, at most GRID_LIMIT per side; `only_first` /
    `only_second`: updates one adapter lacks; `note`: a one-line caveat or ''."""

    modules: pd.DataFrame
    grids: dict[str, np.ndarray]
    only_first: list[str]
    only_second: list[str]
    note: str


def subspace_similarity(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """phi(i, j) for i = 1..k1, j = 1..k2 from orthonormal columns u1 (d, k1) and u2 (d, k2)."""
    squared = (u1.T @ u2) ** 2  # (k1, k2)
    cumulative = squared.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, u1.shape[1] + 1)[:, None]
    j = np.arange(1, u2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def compare_adapters(first: Adapter, second: Adapter, energy: float = 0.9) -> Comparison:
    """Subspace similarity of every update `first` and `second` share, module by module. Raises
    `AdapterError` when they share none or a shared module's shape differs (different bases)."""
    modules_1 = {m.module: m for m in adapter_modules(first)}
    modules_2 = {m.module: m for m in adapter_modules(second)}
    shared = [name for name in modules_1 if name in modules_2]
    if not shared:
        raise AdapterError(
            f"{first.label} and {second.label} adapt no module in common: compare adapters of the same base model"
        )
    for name in shared:
        shape_1, shape_2 = modules_1[name].shape, modules_2[name].shape
        if shape_1 != shape_2 or modules_1[name].experts != modules_2[name].experts:
            raise AdapterError(
                f"{name} is {shape_1[0]}x{shape_1[1]} in {first.label} but {shape_2[0]}x{shape_2[1]} in "
                f"{second.label}: the adapters are for different base models"
            )
    rows, grids = [], {}
    with open_weights(first) as reader_1, open_weights(second) as reader_2:
        for name in shared:
            m1, m2 = modules_1[name], modules_2[name]
            pairs = zip(factors(m1, reader_1, first.label), factors(m2, reader_2, second.label))
            for expert, ((b1, a1), (b2, a2)) in enumerate(pairs):
                s1, s2 = spectrum(b1, a1, m1.scale, vectors=True), spectrum(b2, a2, m2.scale, vectors=True)
                row, grid = _compare_one(s1, s2, energy)
                row_name = m1.row_name(expert)
                grids[row_name] = grid
                rows.append({"name": row_name, "module": name, "type": m1.type, "layer": m1.layer, "r_first": m1.r, "r_second": m2.r, **row})  # fmt: skip
    bases = first.base_model, second.base_model
    note = ""
    if bases[0] and bases[1] and bases[0] != bases[1]:
        note = f"the configs name different base models ({bases[0]} and {bases[1]}); their shapes match"
    return Comparison(
        pd.DataFrame(rows),
        grids,
        sorted(set(modules_1) - set(modules_2)),
        sorted(set(modules_2) - set(modules_1)),
        note,
    )


def _compare_one(s1: Spectrum, s2: Spectrum, energy: float) -> tuple[dict, np.ndarray]:
    """The summary row and the input-side phi grid of one pair of updates. An update that is zero
    (B still at its zero initialisation) has no directions: its phi values are NaN."""
    column = energy_column(energy)
    k = int(max(1, min(rank_measures(s1.singular, (energy,))[column], rank_measures(s2.singular, (energy,))[column])))
    right_1, right_2 = s1.right.numpy(), s2.right.numpy()
    grid = subspace_similarity(right_1[:, :GRID_LIMIT], right_2[:, :GRID_LIMIT])
    phi_out_k = float(subspace_similarity(s1.left.numpy()[:, :k], s2.left.numpy()[:, :k])[-1, -1])
    phi_k = float(subspace_similarity(right_1[:, :k], right_2[:, :k])[-1, -1])
    row = {"k": k, "phi_top": float(grid[0, 0]), "phi_k": phi_k, "phi_out_k": phi_out_k}
    if not (s1.singular[:1].any() and s2.singular[:1].any()):
        grid = np.full_like(grid, np.nan)
        row |= {"phi_top": math.nan, "phi_k": math.nan, "phi_out_k": math.nan}
    return row, grid
