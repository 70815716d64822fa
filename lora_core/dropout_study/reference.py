"""The dropout study's reference: each configuration trained on its own with plain PyTorch
(nn.Parameter, autograd, torch.optim.Adam), on the same random numbers as the batched program.
The tests check the batched program against it and bench/bench_dropout.py times the two.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from lora_core.dropout_study.streams import make_streams
from lora_core.dropout_study.study import DropoutStudy, check_study


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
