"""Synthetic simulations behind the rank, alpha and dropout pages; pure functions returning DataFrames.

Deterministic given a seed; the device is chosen automatically (CUDA, then MPS, then CPU) or
passed explicitly. Never imports streamlit.

Where the seed article's rank experiment (In[4]) draws a new target, new data and a new
initialisation for every rank, `simulate_rank_sweep` fits **one** target from **one** data set and
**one** initialisation (rank r uses the first r rows of a shared A), trains all ranks together in
one tensor program, and reports each rank's closed-form optimum (reduced-rank regression,
Eckart-Young on the fitted values) so a curve's gap to its floor is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lora_core.devices import pick_device
from lora_core.errors import InputError, positive_int_problem, short_repr
from lora_core.settings import lora_scale

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def device_description(device: str | None = None) -> str:
    """A human line naming the device simulations run on."""
    import torch

    device = pick_device(device)
    if device.startswith("cuda"):
        return f"CUDA: {torch.cuda.get_device_name(torch.device(device))}"
    if device == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def make_rank_task(
    d_in: int = 256, d_out: int = 256, true_rank: int = 8, num_samples: int = 500, noise: float = 0.1, seed: int = 42
):
    """The article's synthetic task: target `U @ V / sqrt(true_rank)` of rank `true_rank`,
    inputs `X ~ N(0, 1)` of shape (num_samples, d_in), `Y = X @ target.T + noise * N(0, 1)`.
    Returns (target, X, Y) as float32 CPU tensors."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(d_out, true_rank, generator=generator)
    v = torch.randn(true_rank, d_in, generator=generator)
    target = u @ v / math.sqrt(true_rank)
    x = torch.randn(num_samples, d_in, generator=generator)
    y = x @ target.T + torch.randn(num_samples, d_out, generator=generator) * noise
    return target, x, y


def rank_floors(x, y, ranks: Sequence[int]) -> dict[int, float]:
    """Closed-form minimum of `mean((x @ W.T - y) ** 2)` over W of rank <= r, for each r.

    Reduced-rank regression: the least-squares fit Y_hat = X W_ols^T, truncated to its top r
    singular directions (Eckart-Young), is optimal; its loss is the least-squares residual plus the
    discarded singular values squared. Computed in float64.
    """
    return _floors(_least_squares(_moments(x, y)), ranks)


def _floors(fit, ranks: Sequence[int]) -> dict[int, float]:
    energy = fit.fitted_singular**2
    return {r: (fit.residual + float(energy[r:].sum())) / fit.moments.count for r in ranks}


def simulate_rank_sweep(
    d_in: int = 256,
    d_out: int = 256,
    true_rank: int = 8,
    ranks: Sequence[int] = (2, 4, 8, 16, 32),
    num_samples: int = 500,
    epochs: int = 100,
    lr: float = 0.01,
    noise: float = 0.1,
    seed: int = 42,
    device: str | None = None,
) -> pd.DataFrame:
    """Train a LoRA pair (B @ A, B initialised to zero, A ~ 0.01 N(0, 1)) with full-batch Adam on
    the article's task for every rank at once. Returns one row per (rank, epoch): `rank`, `epoch`,
    `loss` (the MSE before that epoch's step, as the article records it) and `floor` (that rank's
    closed-form optimum). Raises InputError for non-positive sizes or ranks. The losses cancel to
    ~1e-5 of ||Y||^2 near the optimum and are formed in float64, which MPS lacks: there the sweep
    runs on the CPU (`rank_sweep_device`).
    """
    problems = _positive_int_problems(
        d_in=d_in, d_out=d_out, true_rank=true_rank, num_samples=num_samples, epochs=epochs
    )
    ranks = list(ranks)
    problems += _positive_int_problems(**{f"ranks[{i}]": r for i, r in enumerate(ranks)})
    if not ranks:
        problems.append("`ranks` must name at least one rank")
    if lr <= 0 or noise < 0:
        problems.append("`lr` must be > 0 and `noise` >= 0")
    _raise_any(problems)
    ranks = sorted(set(ranks))
    device = rank_sweep_device(device)
    _target, x, y = make_rank_task(d_in, d_out, true_rank, num_samples, noise, seed)
    init_a = shared_init(max(ranks), d_in, seed)
    moments = _moments(x, y)
    losses = _train_concatenated(moments, init_a, ranks, epochs, lr, device)
    floors = _floors(_least_squares(moments), ranks)
    return pd.DataFrame(
        {
            "rank": np.repeat(ranks, epochs),
            "epoch": np.tile(np.arange(epochs), len(ranks)),
            "loss": losses.T.reshape(-1),
            "floor": np.repeat([floors[r] for r in ranks], epochs),
        }
    )


def rank_sweep_device(preference: str | None = None) -> str:
    """Where `simulate_rank_sweep` runs: `pick_device`, except the CPU in place of MPS (no float64)."""
    device = pick_device(preference)
    return "cpu" if device == "mps" else device


def shared_init(max_rank: int, d_in: int, seed: int):
    """The A every rank starts from (rank r takes its first r rows): 0.01 * N(0, 1), as the article."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(max_rank, d_in, generator=generator) * 0.01


def _train_concatenated(moments, init_a, ranks: list[int], epochs: int, lr: float, device: str) -> np.ndarray:
    """All ranks' A stacked into one (R = sum r, d_in) matrix and B into one (d_out, R) matrix;
    block-diagonal masks keep the ranks independent, so this is exactly one Adam run per rank
    (Adam is elementwise).

    Everything uses the sufficient statistics S = X^T X, C = Y^T X of the MSE, so no (n, d_out)
    prediction is ever formed (M_r = A_r S A_r^T, k = 2 / (n d_out), folded into S and C once):
      dB_r = k (B_r M_r - C A_r^T),  dA_r = k (B_r^T B_r A_r S - B_r^T C)
      loss_r = (tr(B_r M_r B_r^T) - 2 tr(B_r A_r C^T) + ||Y||^2) / (n d_out)
    The loss terms are ~||Y||^2 and cancel near the optimum, so they are formed in float64.
    Returns losses of shape (epochs, len(ranks)).
    """
    import torch

    d_out, d_in = moments.c.shape
    k = 2.0 / moments.count
    total = sum(ranks)
    f64, f32 = torch.float64, torch.float32
    stats = torch.cat([moments.s, moments.c]).mul_(k).to(device, f64)  # (d_in + d_out, d_in): k [S; C]
    owner = torch.cat([torch.full((r,), i, device=device) for i, r in enumerate(ranks)])  # (R,)
    one_hot = torch.nn.functional.one_hot(owner, len(ranks)).to(f64)  # (R, n_ranks)
    block = one_hot @ one_hot.T  # (R, R) block-diagonal mask
    block32 = block.to(f32)
    # Parameters stay float32 as in the article; one flat buffer holds A (R, d_in) then B (d_out, R)
    # so Adam is one fused op and one copy makes the float64 version.
    theta = torch.cat([torch.cat([init_a[:r] for r in ranks]).reshape(-1), torch.zeros(d_out * total)]).to(device)
    grad = torch.zeros_like(theta)
    theta64 = torch.empty_like(theta, dtype=f64)
    _, b = _split_params(theta, total, d_in, d_out)
    grad_a, grad_b = _split_params(grad, total, d_in, d_out)
    a64, b64 = _split_params(theta64, total, d_in, d_out)
    # Every intermediate has a buffer made once: a fresh (512, R) float64 result each epoch costs a
    # page-faulting allocation that measured ~15% of the loop.
    s_c_a = torch.empty(d_in + d_out, total, device=device, dtype=f64)  # k [S A^T; C A^T]
    s_a, c_a = s_c_a[:d_in], s_c_a[d_in:]
    s_a32 = torch.empty(d_in, total, device=device, dtype=f32)
    gram = torch.empty(total, total, device=device, dtype=f64)  # M = A S A^T, masked
    bm_2ca = torch.empty(d_out, total, device=device, dtype=f64)  # k (B M - 2 C A^T), then k (B M - C A^T)
    product = torch.empty_like(bm_2ca)
    c_and_b = torch.empty(d_out, d_in + total, device=device, dtype=f32)  # k [C | B] for B^T [C | B]
    c_and_b[:, :d_in] = stats[d_in:]
    b_slot = c_and_b[:, d_in:]
    bt_c_b = torch.empty(total, d_in + total, device=device, dtype=f32)
    bt_c, bt_b = bt_c_b[:, :d_in], bt_c_b[:, d_in:]
    adam = _Adam(theta, lr)
    # traces[step, j] = b_j . (k (B M - 2 C A^T))_j; summed over rank r's columns this is
    # k (tr(B_r M_r B_r^T) - 2 tr(B_r A_r C^T)) = 2 (loss_r - ||Y||^2 / (n d_out))
    traces = torch.empty(epochs, total, device=device, dtype=f64)
    for step in range(epochs):
        theta64.copy_(theta)
        torch.mm(stats, a64.T, out=s_c_a)
        torch.mm(a64, s_a, out=gram).mul_(block)
        torch.addmm(c_a, b64, gram, beta=-2, out=bm_2ca)
        torch.sum(torch.mul(bm_2ca, b64, out=product), 0, out=traces[step])
        grad_b.copy_(bm_2ca.add_(c_a))
        b_slot.copy_(b)
        torch.mm(b.T, c_and_b, out=bt_c_b)
        bt_b.mul_(block32)
        s_a32.copy_(s_a)
        torch.addmm(bt_c, bt_b, s_a32.T, beta=-1, out=grad_a)
        adam.step(grad)
    losses = (traces @ one_hot) / 2 + moments.yy / moments.count  # (epochs, n_ranks)
    return losses.cpu().numpy()


def _split_params(flat, total: int, d_in: int, d_out: int):
    """Views of a flat parameter-shaped buffer as A (R, d_in) and B (d_out, R)."""
    return flat[: total * d_in].view(total, d_in), flat[total * d_in :].view(d_out, total)


class _Adam:
    """torch.optim.Adam (Kingma & Ba 2015, bias-corrected, no weight decay) on one flat tensor,
    through the same fused kernel `torch.optim.Adam(fused=True)` dispatches to, without the
    per-step Python of the optimizer class; an elementwise fallback elsewhere."""

    def __init__(self, param, lr: float) -> None:
        import torch

        self.torch, self.param, self.lr = torch, param, lr
        self.moment, self.velocity = torch.zeros_like(param), torch.zeros_like(param)
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)
        self.fused = hasattr(torch, "_fused_adam_") and param.device.type in ("cpu", "cuda")

    def step(self, grad) -> None:
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        if self.fused:
            self.torch._fused_adam_(
                [self.param], [grad], [self.moment], [self.velocity], [], [self.steps],
                amsgrad=False, lr=self.lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=ADAM_EPS, maximize=False,
            )  # fmt: skip
            return
        t = float(self.steps)
        self.moment.lerp_(grad, 1 - beta1)
        self.velocity.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = self.velocity.sqrt().div_(math.sqrt(1 - beta2**t)).add_(ADAM_EPS)
        self.param.addcdiv_(self.moment, denom, value=-self.lr / (1 - beta1**t))


@dataclass(frozen=True)
class _Moments:
    s: Any  # X^T X, float64 (d_in, d_in)
    c: Any  # Y^T X, float64 (d_out, d_in)
    yy: float  # ||Y||^2
    samples: int  # n

    @property
    def count(self) -> int:
        """Y's element count n * d_out, the MSE's divisor."""
        return self.samples * self.c.shape[0]


@dataclass(frozen=True)
class _LeastSquaresFit:
    moments: _Moments
    residual: float  # ||Y - X W_ols^T||^2
    fitted_singular: Any  # singular values of X W_ols^T, descending


def _moments(x, y) -> _Moments:
    """The MSE's sufficient statistics on the CPU, accumulated in float64 (each product of two
    float32 values is exact there)."""
    x64, y64 = x.double().cpu(), y.double().cpu()
    flat = y64.reshape(-1)
    return _Moments(x64.T @ x64, y64.T @ x64, float(flat @ flat), x64.shape[0])


def _least_squares(moments: _Moments) -> _LeastSquaresFit:
    """The least-squares fit of Y ~ X W^T in float64 on the CPU, through a Cholesky factor
    S = L L^T: with Z = L^-1 C^T, the fitted Y_hat = X W_ols^T has Gram C S^-1 C^T = Z^T Z, so
    ||Z||^2 is its energy, ||Y||^2 - ||Z||^2 the residual, and Z's squared singular values are
    Y_hat's. With fewer samples than d_in, S is singular: a tiny ridge (jitter) makes it definite;
    the residual of that W = C (S + jitter I)^-1 is ||Y||^2 - ||Z||^2 - jitter ||W||^2, and Z's
    singular values are Y_hat's up to O(jitter)."""
    import torch

    s, c = moments.s, moments.c
    d_out, d_in = c.shape
    jitter = 0.0
    singular = True  # with fewer samples than inputs
    if moments.samples >= d_in:
        chol, info = torch.linalg.cholesky_ex(s)
        singular = bool(int(info))  # numerically singular
    if singular:  # a tiny ridge
        jitter = 1e-10 * float(s.diagonal().mean())
        chol = torch.linalg.cholesky(s + jitter * torch.eye(d_in, dtype=s.dtype))
    z = torch.linalg.solve_triangular(chol, c.T, upper=False)  # (d_in, d_out)
    fitted = float(z.square().sum())
    if jitter:
        fitted += jitter * float(torch.linalg.solve_triangular(chol.T, z, upper=True).square().sum())
    eig = torch.linalg.eigvalsh(z @ z.T if d_in <= d_out else z.T @ z).clamp_min(0).flip(0)
    return _LeastSquaresFit(moments, max(moments.yy - fitted, 0.0), eig.sqrt())


def article_rank_loop(
    d_in: int = 256,
    d_out: int = 256,
    true_rank: int = 8,
    ranks: Sequence[int] = (2, 4, 8, 16, 32),
    num_samples: int = 500,
    epochs: int = 100,
    lr: float = 0.01,
    noise: float = 0.1,
    seed: int = 42,
) -> pd.DataFrame:
    """The article's In[4] loop (nn.Parameter, torch.optim.Adam, one rank after another), corrected
    to share the target, data and initialisation: the reference `bench_simulate.py` times."""
    import torch

    _target, x, y = make_rank_task(d_in, d_out, true_rank, num_samples, noise, seed)
    init_a = shared_init(max(ranks), d_in, seed)
    rows = []
    for r in sorted(ranks):
        a = torch.nn.Parameter(init_a[:r].clone())
        b = torch.nn.Parameter(torch.zeros(d_out, r))
        optimizer = torch.optim.Adam([a, b], lr=lr)
        for epoch in range(epochs):
            optimizer.zero_grad()
            loss = ((x @ (b @ a).T - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            rows.append((r, epoch, loss.item()))
    return pd.DataFrame(rows, columns=["rank", "epoch", "loss"])


def reconstruction_error(
    d: int = 256, true_rank: int = 8, max_rank: int = 32, seed: int = 42, d_out: int | None = None
) -> pd.DataFrame:
    """Relative Frobenius error of the best rank-r approximation of a rank-`true_rank` target
    (article Out[6]), by SVD (Eckart-Young): `sqrt(sum_{i>r} s_i^2) / ||T||_F`. One row per r in
    1..max_rank with `rank`, `error`, `singular_value` (s_r)."""
    import torch

    _raise_any(_positive_int_problems(d=d, true_rank=true_rank, max_rank=max_rank))
    target, _, _ = make_rank_task(d, d_out or d, true_rank, 1, 0.0, seed)
    singular = torch.linalg.svdvals(target.double())
    energy = singular**2
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[r] = sum_{i>=r} s_i^2
    ranks = np.arange(1, max_rank + 1)
    total = float(energy.sum())
    errors = [math.sqrt(float(tail[r]) / total) if r < len(tail) else 0.0 for r in ranks]
    values = [float(singular[r - 1]) if r <= len(singular) else 0.0 for r in ranks]
    return pd.DataFrame({"rank": ranks, "error": errors, "singular_value": values})


def alpha_output_stats(
    d_in: int = 512,
    d_out: int = 512,
    rank: int = 16,
    alphas: Sequence[float] = (4, 8, 16, 32, 64),
    num_samples: int = 1000,
    use_rslora: bool = False,
    seed: int = 42,
    device: str | None = None,
) -> pd.DataFrame:
    """Article In[7]/Out[8]: output spread of a frozen W (N(0, 1/d_in)) and a LoRA branch
    (A, B ~ 0.1 N(0, 1)) scaled by alpha/r (or alpha/sqrt(r)). One row per alpha: `alpha`, `scale`,
    `original_std`, `lora_std`, `combined_std`, `lora_ratio`; all alphas in one batched pass."""
    import torch

    _raise_any(_positive_int_problems(d_in=d_in, d_out=d_out, rank=rank, num_samples=num_samples))
    device = pick_device(device)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=generator) / math.sqrt(d_in)
    a = torch.randn(rank, d_in, generator=generator) * 0.1
    b = torch.randn(d_out, rank, generator=generator) * 0.1
    x = torch.randn(num_samples, d_in, generator=generator)
    w, a, b, x = (t.to(device) for t in (w, a, b, x))
    alphas_t = torch.tensor([float(al) for al in alphas], device=device)
    scales = lora_scale(rank, alphas_t, use_rslora)  # (n_alpha,)
    original = x @ w.T  # (n, d_out)
    branch = (x @ a.T) @ b.T  # (n, d_out)
    lora = scales[:, None, None] * branch  # (n_alpha, n, d_out)
    combined = original + lora
    lora_std = lora.flatten(1).std(1)
    return pd.DataFrame(
        {
            "alpha": [float(al) for al in alphas],
            "scale": scales.cpu().numpy(),
            "original_std": float(original.std()),
            "lora_std": lora_std.cpu().numpy(),
            "combined_std": combined.flatten(1).std(1).cpu().numpy(),
            "lora_ratio": (lora_std / original.std()).cpu().numpy(),
        }
    )


def scale_grid(alphas: Sequence[float], ranks: Sequence[int], use_rslora: bool = False) -> pd.DataFrame:
    """Effective scale alpha/r (or alpha/sqrt(r) with rsLoRA) over alpha x rank (article Out[9])."""
    rows = [
        {"alpha": float(al), "rank": int(r), "scale": lora_scale(r, al, use_rslora)} for al in alphas for r in ranks
    ]
    return pd.DataFrame(rows)


def simulate_dropout(
    d_in: int = 256,
    d_out: int = 256,
    rank: int = 16,
    dropout_rates: Sequence[float] = (0.0, 0.05, 0.1, 0.2),
    num_forward: int = 1000,
    seed: int = 42,
    device: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Article In[18]-Out[20]: the LoRA branch `B @ Dropout(A x)` over `num_forward` passes for each
    rate, vectorised (one mask tensor per rate, no loop over passes).

    Returns (stats, samples): `stats` one row per rate with `dropout`, `std` (per-output std over
    passes, averaged), `min`, `max`, `expected_active_rank` r(1-p); `samples` the outputs in long
    form (`dropout`, `value`) for histograms.
    """
    import torch

    problems = _positive_int_problems(d_in=d_in, d_out=d_out, rank=rank, num_forward=num_forward)
    if any(not 0 <= p < 1 for p in dropout_rates):
        problems.append(f"`dropout_rates` must be in [0, 1), got {short_repr(list(dropout_rates))}")
    _raise_any(problems)
    device = pick_device(device)
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, d_in, generator=generator) * 0.1
    b = torch.randn(d_out, rank, generator=generator) * 0.1
    x = torch.randn(1, d_in, generator=generator)
    ax = (x @ a.T).to(device)  # (1, rank)
    b = b.to(device)
    rates = torch.tensor([float(p) for p in dropout_rates], device=device)  # (P,)
    uniform = torch.rand(len(dropout_rates), num_forward, rank, generator=generator).to(device)
    keep = (uniform >= rates[:, None, None]).to(ax.dtype) / (1 - rates[:, None, None])  # inverted dropout
    outputs = (keep * ax) @ b.T  # (P, passes, d_out)
    stats = pd.DataFrame(
        {
            "dropout": [float(p) for p in dropout_rates],
            "std": outputs.std(1).mean(1).cpu().numpy(),
            "min": outputs.amin((1, 2)).cpu().numpy(),
            "max": outputs.amax((1, 2)).cpu().numpy(),
            "expected_active_rank": [rank * (1 - float(p)) for p in dropout_rates],
        }
    )
    values = outputs.reshape(len(dropout_rates), -1).cpu().numpy()
    samples = pd.DataFrame(
        {"dropout": np.repeat([float(p) for p in dropout_rates], values.shape[1]), "value": values.reshape(-1)}
    )
    return stats, samples


def dropout_histogram(samples: pd.DataFrame, bins: int = 80) -> pd.DataFrame:
    """Bin `simulate_dropout`'s samples on edges shared by all rates, so the page ships bins to the
    browser, not the samples (1,000 passes x 256 outputs x rates is over a million values).
    One row per (rate, bin): `dropout`, `left`, `right`, `center`, `count`."""
    _raise_any(_positive_int_problems(bins=bins))
    edges = np.histogram_bin_edges(samples["value"].to_numpy(), bins=bins)
    frames = []
    for rate, values in samples.groupby("dropout", sort=True)["value"]:
        counts, _ = np.histogram(values.to_numpy(), bins=edges)
        frames.append(
            pd.DataFrame(
                {
                    "dropout": rate,
                    "left": edges[:-1],
                    "right": edges[1:],
                    "center": (edges[:-1] + edges[1:]) / 2,
                    "count": counts,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _positive_int_problems(**values: object) -> list[str]:
    return [problem for name, value in values.items() if (problem := positive_int_problem(name, value))]


def _raise_any(problems: list[str]) -> None:
    """Every problem found in one input, raised once."""
    if problems:
        raise InputError("; ".join(problems))
