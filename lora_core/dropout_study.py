"""The dropout study: does lora_dropout lower held-out loss, and where? A simulation that tests the
seed article's claims instead of drawing output histograms.

Task: inputs x ~ N(0, I_d), a frozen base W0 and a target y = (W0 + D*) x + noise, where D* has low
true rank k and ||D*||_F^2 = d (signal variance 1 per output). Only the adapter trains:
h = W0 x + (alpha / r) B A Dropout(x), which is where PEFT puts lora_dropout
(`lora_B(lora_A(dropout(x))) * scaling`); the article's B Dropout(A x) is the `"rank"` placement.
W0 x appears in both h and y, so it cancels from every loss and is never formed. A is PEFT's
kaiming-uniform (a = sqrt(5): U(-1/sqrt(d), 1/sqrt(d))), B is zero; Adam with a linear decay to 0
(transformers' default schedule), inverted dropout with fresh masks each step, evaluation without
dropout. The held-out loss is the exact expected MSE on fresh data, ||(alpha/r) B A - D*||_F^2 / d
+ noise^2 (x ~ N(0, I)), so it carries no sampling noise of its own.

Every configuration (rank x rate x training-set size x seed) trains in one loop over steps:
configurations of one rank form one batched tensor (config axis first), ranks are groups. The
random numbers come from per-seed streams that do not depend on the grid (rank r takes the first r
rows of one A, a set of n samples is the first n rows of one data set, every rate thresholds the
same uniforms), so a configuration's result is the same whichever others run with it, and
`dropout_study_loop` reproduces it one configuration at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from lora_core.errors import InputError, is_int, positive_int_problem, short_repr
from lora_core.simulate import rank_sweep_device

Placement = Literal["input", "rank"]
PLACEMENTS: dict[str, str] = {
    "input": "PEFT: B A Dropout(x)",
    "rank": "article: B Dropout(A x)",
}
MAX_SAMPLES = 65_536
MAX_STEPS = 5_000
MAX_SEEDS = 16
MAX_D = 512
MAX_BYTES = 2 * 1024**3  # tensors the study holds at once
DATA_CHUNK = 256  # rows drawn per call, so the first n rows do not depend on the largest n
GAIN_FLOOR = 0.01  # a relative change below 1% is reported as no effect, whatever the seeds say


@dataclass(frozen=True)
class DropoutStudy:
    """One study's grid and task. `alpha_per_rank` sets lora_alpha = alpha_per_rank * r (the
    article's common alpha = 2r), so the scale alpha / r is the same at every rank."""

    ranks: tuple[int, ...] = (1, 4, 16, 64)
    rates: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    samples: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    seeds: int = 3
    d: int = 64
    true_rank: int = 4
    noise: float = 1.0
    steps: int = 300
    batch: int = 64
    lr: float = 0.01
    alpha_per_rank: float = 2.0
    placement: Placement = "input"
    evals: int = 15
    seed: int = 0

    @property
    def scale(self) -> float:
        """alpha / r (PEFT's `scaling`)."""
        return self.alpha_per_rank

    def eval_steps(self) -> list[int]:
        """The steps after which losses are recorded: 0 (before training), evenly to `steps`."""
        return sorted({round(i * self.steps / self.evals) for i in range(self.evals + 1)})


DEFAULT_STUDY = DropoutStudy()


def study_problems(study: DropoutStudy) -> list[str]:
    """Every problem with `study`, each naming its field in backticks; empty when it can run."""
    problems = [
        p
        for name, value, limit in (
            ("d", study.d, MAX_D),
            ("seeds", study.seeds, MAX_SEEDS),
            ("steps", study.steps, MAX_STEPS),
            ("batch", study.batch, MAX_SAMPLES),
            ("evals", study.evals, MAX_STEPS),
        )
        if (p := positive_int_problem(name, value, limit))
    ]
    d = study.d if is_int(study.d) and 1 <= study.d <= MAX_D else MAX_D
    if p := positive_int_problem("true_rank", study.true_rank, d):
        problems.append(p)
    for name, values, limit in (("ranks", study.ranks, d), ("samples", study.samples, MAX_SAMPLES)):
        if not values:
            problems.append(f"`{name}` must name at least one value")
        bad = [v for v in values if positive_int_problem(name, v, limit)]
        if bad:
            problems.append(
                f"`{name}` must be integers in 1..{limit:,} (the layer width d for ranks), got {short_repr(bad)}"
            )
    if not study.rates:
        problems.append("`rates` must name at least one dropout rate")
    bad_rates = [p for p in study.rates if not (isinstance(p, (int, float)) and 0 <= p < 1)]
    if bad_rates:
        problems.append(f"`rates` must be dropout rates in [0, 1), got {short_repr(bad_rates)}")
    for name, value, low in (
        ("noise", study.noise, 0.0),
        ("lr", study.lr, None),
        ("alpha_per_rank", study.alpha_per_rank, None),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if low == 0.0 else value > 0)):
            problems.append(
                f"`{name}` must be a finite number {'>= 0' if low == 0.0 else '> 0'}, got {short_repr(value)}"
            )
    if study.placement not in PLACEMENTS:
        problems.append(f"`placement` must be one of {', '.join(PLACEMENTS)}, got {short_repr(study.placement)}")
    if not is_int(study.seed) or not 0 <= study.seed < 2**31:
        problems.append(f"`seed` must be an integer in 0..2**31-1, got {short_repr(study.seed)}")
    if not problems and (need := study_bytes(study)) > MAX_BYTES:
        problems.append(
            f"the study needs ~{need / 1024**3:.1f} GiB (over {MAX_BYTES / 1024**3:.0f} GiB): "
            "pick fewer ranks, rates, sample sizes or seeds, or fewer steps"
        )
    return problems


def study_bytes(study: DropoutStudy) -> int:
    """A float32 estimate of what the study holds at once: the seeds' data and per-step random
    numbers, four copies of every parameter (value, gradient, Adam's two moments), one step's
    activations and the recorded curves."""
    d, batch, seeds = study.d, study.batch, study.seeds
    data_configs = len(study.rates) * len(study.samples) * seeds
    rows = -(-max(study.samples) // DATA_CHUNK) * DATA_CHUNK
    streams = seeds * (2 * rows * d + study.steps * batch * (d + 1) + d * d)
    params = 4 * data_configs * sum(2 * r * d for r in set(study.ranks))
    activations = data_configs * batch * (3 * d + 3 * max(study.ranks)) + len(study.samples) * seeds * 2 * d * d * 2
    curves = 2 * data_configs * len(set(study.ranks)) * (study.evals + 1) * 2
    return 4 * (streams + params + activations + curves)


def check_study(study: DropoutStudy) -> DropoutStudy:
    """`study` with its lists sorted and deduplicated; raises InputError naming every problem."""
    problems = study_problems(study)
    if problems:
        raise InputError("; ".join(problems))
    return replace(
        study,
        ranks=tuple(sorted(set(study.ranks))),
        rates=tuple(sorted({float(p) for p in study.rates})),
        samples=tuple(sorted(set(study.samples))),
    )


@dataclass(frozen=True)
class _Streams:
    """One seed's random numbers, stacked over seeds (leading axis S)."""

    target: Any  # (S, d, d) D*
    x: Any  # (S, rows, d) inputs
    y: Any  # (S, rows, d) D* x + noise: the target minus the frozen base's output
    init_a: Any  # (S, d, d) A for rank d; rank r takes the first r rows
    positions: Any  # (S, steps, batch) uniforms in [0, 1): minibatch row = floor(u * n)
    keep: Any  # (S, steps, batch, d) uniforms: dropout keeps an element where u >= p


def make_streams(study: DropoutStudy):
    """The per-seed random numbers, drawn on the CPU in float32 with sizes that do not depend on
    the grid (see the module docstring). Seed s of the study uses generators 2(seed+s) (task,
    init, data) and 2(seed+s)+1 (per-step numbers)."""
    import torch

    d, k = study.d, study.true_rank
    rows = -(-max(study.samples) // DATA_CHUNK) * DATA_CHUNK
    parts: dict[str, list] = {name: [] for name in _Streams.__dataclass_fields__}
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
    return _Streams(**{name: torch.stack(values) for name, values in parts.items()})


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


def _train_moments(streams: _Streams, samples: Sequence[int], device: str) -> _Moments:
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


def dropout_study_loop(
    study: DropoutStudy, configs: Iterable[tuple[int, float, int, int]] | None = None
) -> pd.DataFrame:
    """The reference: each (rank, dropout, samples, seed) config trained on its own with its own
    small tensors (nn.Parameter, autograd, torch.optim.Adam, nn.functional.dropout's arithmetic
    on the same uniforms), one after another on the CPU. Same rows as `run_dropout_study` for the
    configs given (all of the study's when None)."""
    import torch

    study = check_study(study)
    streams = make_streams(study)
    chosen = (
        configs
        if configs is not None
        else ((r, p, n, s) for r in study.ranks for p in study.rates for n in study.samples for s in range(study.seeds))
    )
    evals, rows = study.eval_steps(), []
    for r, p, n, s in chosen:
        a = torch.nn.Parameter(streams.init_a[s, :r].clone())
        b = torch.nn.Parameter(torch.zeros(study.d, r))
        optimizer = torch.optim.Adam([a, b], lr=study.lr)
        x, y, target = streams.x[s, :n], streams.y[s, :n], streams.target[s]
        for step in range(study.steps + 1):
            if step in evals:
                with torch.no_grad():
                    delta = study.scale * b @ a
                    train = ((x @ delta.T - y) ** 2).mean().item()
                    heldout = ((delta - target) ** 2).sum().item() / study.d + study.noise**2
                rows.append((r, step, p, n, s, train, heldout))
            if step == study.steps:
                break
            index = torch.arange(n) if n <= study.batch else (streams.positions[s, step] * n).long().clamp(max=n - 1)
            keep = (streams.keep[s, step, : len(index)] >= p).float() / (1 - p)
            xb, yb = x[index], y[index]
            if study.placement == "input":
                prediction = (xb * keep) @ a.T @ b.T * study.scale
            else:
                prediction = ((xb @ a.T) * keep[:, :r]) @ b.T * study.scale
            loss = ((prediction - yb) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.param_groups[0]["lr"] = study.lr * (1 - step / study.steps)
            optimizer.step()
    columns = ["rank", "step", "dropout", "samples", "seed", "train_loss", "heldout_loss"]
    return pd.DataFrame(rows, columns=columns)


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


Verdict = Literal["holds", "partly", "does not hold", "untested"]
LOW_RANK = 4  # the article: "very low ranks (<= 4) work fine without dropout"
ARTICLE_RATES = (0.05, 0.1)  # the article's rates for small data sets


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
