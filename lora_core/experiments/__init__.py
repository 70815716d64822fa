"""Experiments: a grid of LoRA configs trained on the same data, budget and seeds, compared by
what they learn, their size, memory and time.

`grid` parses and expands grids (and the article's search spaces) into trials; `engine` plans,
submits, runs (locally) and reads back experiments; `ray_tune` runs their trials on a Ray cluster
(the Tune trainable, callback and stopper are `ray_trials`); `cli` is the `sweep` subcommand.
Importing this package imports neither torch nor transformers, nor Ray.
"""

from __future__ import annotations

from lora_core.experiments.engine import (
    RESULT_COLUMNS,
    ExperimentPlan,
    estimate_plan,
    experiment_progress,
    pareto_front,
    plan_experiment,
    ranked,
    results,
    run_local,
    submit_experiment,
    trial_of,
    varied_dimensions,
)
from lora_core.experiments.grid import (
    DIMENSIONS,
    INITS,
    MAX_SEEDS,
    MAX_TRIALS,
    Grid,
    GridError,
    Trial,
    expand,
    grid_size,
    parse_grid,
    parse_value,
    space_grid,
    trial_label,
)

__all__ = [
    "DIMENSIONS",
    "INITS",
    "MAX_SEEDS",
    "MAX_TRIALS",
    "RESULT_COLUMNS",
    "ExperimentPlan",
    "Grid",
    "GridError",
    "Trial",
    "estimate_plan",
    "expand",
    "experiment_progress",
    "grid_size",
    "pareto_front",
    "parse_grid",
    "parse_value",
    "plan_experiment",
    "ranked",
    "results",
    "run_local",
    "space_grid",
    "submit_experiment",
    "trial_label",
    "trial_of",
    "varied_dimensions",
]
