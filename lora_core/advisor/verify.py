"""Verify a recommendation by training it: an experiment around the advised rank and learning
rate on the user's (or the embedded) model and data, and what its result says about the advice."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from lora_core.advisor.advice import Advice
from lora_core.advisor.evidence import load_evidence
from lora_core.advisor.figures import show
from lora_core.experiments import ExperimentPlan, plan_experiment
from lora_core.training.config import TrainConfig


def verify_grid(advice: Advice) -> list[str]:
    """Grid items (as `sweep --grid` takes them): the advised rank with its neighbours on the
    ladder, and the advised learning rate times each of app-verify's factors."""
    evidence = load_evidence()
    ladder = [int(r) for r in evidence.number("app-rank-ladder", "ladder")]  # type: ignore[union-attr]
    r = advice.settings.r
    index = ladder.index(r) if r in ladder else min(range(len(ladder)), key=lambda i: abs(ladder[i] - r))
    ranks = sorted({ladder[max(index - 1, 0)], r, ladder[min(index + 1, len(ladder) - 1)]})
    factors = evidence.number("app-verify", "lr_factors")
    rates = [advice.training.learning_rate * float(f) for f in factors]  # type: ignore[union-attr]
    return [f"r={','.join(str(v) for v in ranks)}", f"lr={','.join(f'{v:.6g}' for v in rates)}"]


def verify_plan(advice: Advice, config: TrainConfig, settings=None, name: str | None = None) -> ExperimentPlan:
    """The Verify experiment: `verify_grid` on `config` (model, data, budget), starting from the
    advised settings (or `settings`, the same mapped onto another model's module names)."""
    from lora_core.experiments.grid import parse_grid

    base = settings if settings is not None else advice.settings
    config = replace(config, learning_rate=advice.training.learning_rate)
    label = name or f"verify: r={advice.settings.r}, lr={show(advice.training.learning_rate)}"
    return plan_experiment(base, config, parse_grid(verify_grid(advice)), name=label)


def verify_verdict(r: int, lr: float, ranking: pd.DataFrame) -> str:
    """What the experiment's ranking (`experiments.ranked`) says about the advised config (rank
    `r`, learning rate `lr`)."""
    if ranking.empty:
        return "No trial has finished yet."
    advised = ranking[(ranking["r"] == r) & _close(ranking["lr"], lr)]
    if advised.empty:
        return "The advised config has not finished: nothing to compare yet."
    row, best = advised.iloc[0], ranking.iloc[0]
    if row["verdict"] == "best":
        return f"The advised config (r={r}) has the lowest eval loss of the {len(ranking)} configs tried."
    gap = float(row["eval_loss"]) - float(best["eval_loss"])
    where = f"r={best['r']}, lr={show(float(best['lr']))}"
    if row["verdict"] == "not significant":
        return f"The advised config is within seed noise of the best ({where}): {gap:.4f} higher eval loss."
    if row["verdict"] == "no seed spread":
        return (
            f"{where} beat the advised config by {gap:.4f} eval loss, with one seed each: "
            "repeat with seeds to tell it from noise."
        )
    return f"{where} beat the advised config by {gap:.4f} eval loss, more than the seeds' spread: prefer it here."


def _close(values: pd.Series, target: float) -> pd.Series:
    return (values.astype(float) - target).abs() <= 1e-9 + 1e-6 * abs(target)
