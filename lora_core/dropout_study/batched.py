"""The dropout study's batched program: every configuration (rank x rate x training-set size x
seed) trains in one loop over steps. Configurations of one rank form one batched tensor (config
axis first), ranks are groups, and one Adam step updates all of them through a flat buffer. The
backward is written by hand (no autograd). The train loss comes from each training set's sufficient
statistics and the held-out loss from its closed form, both in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lora_core.dropout_study.streams import Streams, make_streams
from lora_core.dropout_study.study import DEFAULT_STUDY, DropoutStudy, check_study
from lora_core.simulate import rank_sweep_device


def batch_rows(positions, samples, batch: int):
    """Minibatch row indices and weights for training-set sizes `samples` (N,) from uniforms
    `positions` (..., batch): a set no larger than the batch is used whole every step (rows past n
    get weight 0), a larger one is sampled with replacement. Weights are 1 / (rows used)."""
    import torch

    n = samples.view(-1, *([1] * positions.dim()))  # (N, 1, ..., 1)
    whole = torch.arange(batch, device=positions.device).expand_as(positions)
    rows = torch.where(n <= batch, whole.clamp(max=n - 1), (positions * n).long().clamp(max=n - 1))
    used = n.clamp(max=batch)
    weight = (whole < used).to(positions.dtype) / used
    return rows, weight  # (N, ..., batch) each


def run_dropout_study(study: DropoutStudy = DEFAULT_STUDY, device: str | None = None) -> pd.DataFrame:
    """Train every configuration of `study` together. Returns one row per (rank, dropout, samples,
    seed, step) at `study.eval_steps()`: `train_loss` (MSE on the whole training set, no dropout)
    and `heldout_loss` (the exact expected MSE on fresh data). Raises InputError for a bad study."""
    import torch

    study = check_study(study)
    device = rank_sweep_device(device)  # the losses are formed in float64, which MPS lacks
    streams = make_streams(study)
    shape = (len(study.rates), len(study.samples), study.seeds)  # the config axis, flattened: (P, N, S)
    configs = math.prod(shape)
    x, y = streams.x.to(device), streams.y.to(device)
    positions, keep = streams.positions.to(device), streams.keep.to(device)
    rates = torch.tensor(study.rates, device=device).view(-1, 1, 1, 1, 1)
    sizes = torch.tensor(study.samples, device=device)
    seed_index = torch.arange(study.seeds, device=device).view(1, -1, 1)
    init = [streams.init_a[:, :r].to(device).expand(configs // study.seeds, -1, -1, -1) for r in study.ranks]
    flat = torch.cat([t for a in init for t in (a.reshape(-1), torch.zeros(a.numel(), device=device))])
    flat.grad = torch.zeros_like(flat)
    params, grads = _rank_views(flat, study, configs), _rank_views(flat.grad, study, configs)
    optimizer = torch.optim.Adam([flat], lr=study.lr, fused=device.split(":")[0] in ("cpu", "cuda"))
    moments = _train_moments(streams, study.samples, device)
    target = streams.target.to(device, torch.float64)
    evals = study.eval_steps()
    records = {0: _evaluate(params, study, moments, target, shape)} if 0 in evals else {}
    for step in range(study.steps):
        rows, weight = batch_rows(positions[:, step], sizes, study.batch)  # (N, S, batch)
        xb, yb = x[seed_index, rows], y[seed_index, rows]  # (N, S, batch, d)
        mask = (keep[:, step] >= rates).to(x.dtype) / (1 - rates)  # (P, 1, S, batch, d): inverted dropout
        coef = (2 / study.d) * weight.unsqueeze(-1)  # d loss / d prediction = coef * error
        if study.placement == "input":
            inputs = (xb * mask).reshape(configs, study.batch, study.d)
        else:
            inputs = xb.expand(shape[0], *xb.shape).reshape(configs, study.batch, study.d)
        for (a, b), (grad_a, grad_b) in zip(params.values(), grads.values(), strict=True):
            _gradients(a, b, inputs, mask, yb, coef, study, grad_a, grad_b)
        optimizer.param_groups[0]["lr"] = study.lr * (1 - step / study.steps)  # linear decay to 0
        optimizer.step()
        if step + 1 in evals:
            records[step + 1] = _evaluate(params, study, moments, target, shape)
    return _curves_frame(records, study)


def _rank_views(flat, study: DropoutStudy, configs: int) -> dict[int, tuple[Any, Any]]:
    """Each rank's A (C, r, d) and B (C, d, r) as views of one flat buffer, so Adam is one op."""
    views, start = {}, 0
    for r in study.ranks:
        size = configs * r * study.d
        a = flat[start : start + size].view(configs, r, study.d)
        b = flat[start + size : start + 2 * size].view(configs, study.d, r)
        views[r] = (a, b)
        start += 2 * size
    return views


def _gradients(a, b, inputs, mask, yb, coef, study: DropoutStudy, grad_a, grad_b) -> None:
    """The MSE's gradients for one rank's configs, written into grad_a, grad_b (manual backward of
    pred = s B A Dropout(x), or s B Dropout(A x) for the article's placement)."""
    import torch

    configs, batch, d = inputs.shape
    r = a.shape[1]
    hidden = torch.bmm(inputs, a.transpose(1, 2))  # (C, batch, r)
    if study.placement == "rank":
        rank_mask = mask[..., :r].expand(-1, coef.shape[0], -1, -1, -1).reshape(configs, batch, r)
        hidden = hidden * rank_mask
    prediction = torch.bmm(hidden, b.transpose(1, 2)).mul_(study.scale)  # (C, batch, d)
    error = (prediction.view(-1, *yb.shape) - yb).mul_(coef).view(configs, batch, d)
    torch.bmm(error.transpose(1, 2), hidden, out=grad_b).mul_(study.scale)
    grad_hidden = torch.bmm(error, b).mul_(study.scale)  # (C, batch, r)
    if study.placement == "rank":
        grad_hidden.mul_(rank_mask)
    torch.bmm(grad_hidden.transpose(1, 2), inputs, out=grad_a)


@dataclass(frozen=True)
class _Moments:
    xx: Any  # (N, S, d, d) X_n^T X_n, float64
    yx: Any  # (N, S, d, d) Y_n^T X_n
    yy: Any  # (N, S) ||Y_n||^2
    count: Any  # (N, 1) n * d, the MSE's divisor


def _train_moments(streams: Streams, samples: Sequence[int], device: str) -> _Moments:
    """The whole-training-set MSE's sufficient statistics for every (samples, seed), in float64."""
    import torch

    x, y = streams.x.double(), streams.y.double()
    xx = torch.stack([x[:, :n].transpose(1, 2) @ x[:, :n] for n in samples])
    yx = torch.stack([y[:, :n].transpose(1, 2) @ x[:, :n] for n in samples])
    yy = torch.stack([y[:, :n].square().sum((1, 2)) for n in samples])
    count = torch.tensor([[n * x.shape[-1]] for n in samples], dtype=torch.float64)
    return _Moments(*(t.to(device) for t in (xx, yx, yy, count)))


def _evaluate(params, study: DropoutStudy, moments: _Moments, target, shape) -> np.ndarray:
    """(ranks, P, N, S, 2): each config's train loss (no dropout) and exact held-out loss.
    train = (tr(D S D^T) - 2 tr(D C^T) + ||Y||^2) / (n d) with D = s B A; held-out =
    ||D - D*||_F^2 / d + noise^2, the expectation over fresh x ~ N(0, I) and noise."""
    import torch

    rates, sizes, seeds = shape
    d = study.d
    out = []
    for a, b in params.values():
        delta = (torch.bmm(b.double(), a.double()) * study.scale).view(*shape, d, d)
        # (N S, P d, d) @ (N S, d, d): one bmm, not a broadcast matmul over the rates
        rows = delta.permute(1, 2, 0, 3, 4).reshape(sizes * seeds, rates * d, d)
        spread = torch.bmm(rows, moments.xx.view(-1, d, d)).view(sizes, seeds, rates, d, d).permute(2, 0, 1, 3, 4)
        fit = (spread * delta).sum((-2, -1)) - 2 * (delta * moments.yx).sum((-2, -1))
        train = (fit + moments.yy) / moments.count
        heldout = (delta - target).square().sum((-2, -1)) / study.d + study.noise**2
        out.append(torch.stack([train, heldout], -1))
    return torch.stack(out).cpu().numpy()


def _curves_frame(records: dict[int, np.ndarray], study: DropoutStudy) -> pd.DataFrame:
    steps = sorted(records)
    values = np.stack([records[s] for s in steps], 1)  # (ranks, steps, P, N, S, 2)
    index = pd.MultiIndex.from_product(
        [study.ranks, steps, study.rates, study.samples, range(study.seeds)],
        names=["rank", "step", "dropout", "samples", "seed"],
    )
    frame = pd.DataFrame(values.reshape(-1, 2), index=index, columns=["train_loss", "heldout_loss"])
    return frame.reset_index()
