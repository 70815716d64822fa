"""The dropout study's random numbers, shared by the batched program and the reference loop.

They come from per-seed streams that do not depend on the grid: rank r takes the first r rows of
one A, a set of n samples is the first n rows of one data set, every rate thresholds the same
uniforms. So a configuration's result is the same whichever others run with it, and the
per-configuration loop reproduces it one configuration at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lora_core.dropout_study.study import DATA_CHUNK, DropoutStudy, stream_rows


@dataclass(frozen=True)
class Streams:
    """One seed's random numbers, stacked over seeds (leading axis S)."""

    target: Any  # (S, d, d) D*
    x: Any  # (S, rows, d) inputs
    y: Any  # (S, rows, d) D* x + noise: the target minus the frozen base's output
    init_a: Any  # (S, d, d) A for rank d; rank r takes the first r rows
    positions: Any  # (S, steps, batch) uniforms in [0, 1): minibatch row = floor(u * n)
    keep: Any  # (S, steps, batch, d) uniforms: dropout keeps an element where u >= p


def make_streams(study: DropoutStudy) -> Streams:
    """The per-seed random numbers, drawn on the CPU in float32 with sizes that do not depend on
    the grid (see the module docstring). Seed s of the study uses generators 2(seed+s) (task,
    init, data) and 2(seed+s)+1 (per-step numbers)."""
    import torch

    d, k = study.d, study.true_rank
    rows = stream_rows(study)
    parts: dict[str, list] = {name: [] for name in Streams.__dataclass_fields__}
    for s in range(study.seeds):
        gen = torch.Generator().manual_seed(2 * (study.seed + s))
        u = torch.linalg.qr(torch.randn(d, k, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(d, k, generator=gen))[0]
        target = u @ v.T * math.sqrt(d / k)  # k equal singular values, ||D*||_F^2 = d
        bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) x sqrt(3 / fan_in)
        init_a = (torch.rand(d, d, generator=gen) * 2 - 1) * bound
        xs, noises = [], []
        for _ in range(rows // DATA_CHUNK):
            xs.append(torch.randn(DATA_CHUNK, d, generator=gen))
            noises.append(torch.randn(DATA_CHUNK, d, generator=gen))
        x = torch.cat(xs)
        step_gen = torch.Generator().manual_seed(2 * (study.seed + s) + 1)
        positions, keep = [], []
        for _ in range(study.steps):
            positions.append(torch.rand(study.batch, generator=step_gen))
            keep.append(torch.rand(study.batch, d, generator=step_gen))
        parts["target"].append(target)
        parts["x"].append(x)
        parts["y"].append(x @ target.T + torch.cat(noises) * study.noise)
        parts["init_a"].append(init_a)
        parts["positions"].append(torch.stack(positions))
        parts["keep"].append(torch.stack(keep))
    return Streams(**{name: torch.stack(values) for name, values in parts.items()})
