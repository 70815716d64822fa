"""Experiments: a grid of trials trained on the same data, budget and seeds, each trial an ordinary
run in the store grouped under one experiment record.

`plan_experiment` expands and checks a grid before anything exists; `submit_experiment` writes
the experiment and its queued trials; then either the app's worker trains them (it claims queued
runs oldest first and keeps the base model loaded from one trial to the next, see
`training.BaseModels`), `run_local` trains them in this process (the CLI), or Ray Tune does
(`experiments.ray_tune`). `results` reads an experiment back as one row per trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lora_core.embedded import config_name
from lora_core.errors import InputError, is_int, name_problem, one_line, short_repr
from lora_core.experiments.grid import (
    DIMENSIONS,
    Grid,
    GridError,
    Trial,
    expand,
    space_grid,
)
from lora_core.settings import LoraSettings
from lora_core.store import FINISHED, WORKER, Store
from lora_core.training.config import MAX_STEPS, TrainConfig


@dataclass(frozen=True)
class ExperimentPlan:
    """What an experiment will train, checked: its trials and how they were chosen."""

    name: str
    base_settings: LoraSettings
    base_config: TrainConfig
    grid: Grid
    seeds: int
    trials: list[Trial]
    space: str | None = None
    budget: Mapping[str, int] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """The experiment record's JSON: everything needed to see how its trials were chosen."""
        return {
            "grid": {name: list(values) for name, values in self.grid.items()},
            "space": self.space,
            "seeds": self.seeds,
            "budget": dict(self.budget),
            "base_settings": self.base_settings.to_peft_dict(),
            "base_config": dataclasses.asdict(self.base_config),
            "dimensions": [name for name in DIMENSIONS if name in self.grid],
        }


def plan_experiment(
    base_settings: LoraSettings,
    base_config: TrainConfig,
    grid: Grid | None = None,
    space: str | None = None,
    seeds: int = 1,
    tokens: int | None = None,
    name: str | None = None,
) -> ExperimentPlan:
    """The trials of `grid` (or the article's search space `space`, or both: the grid's values
    replace the space's) on `base_config.model`, `seeds` repeats each. `tokens`, when given, is
    the budget per trial in training tokens (padded, batch x sequence length) instead of steps.
    Raises `InputError` (`GridError`) in one line for anything that cannot run."""
    combined: Grid = dict(space_grid(space)) if space else {}
    combined.update(grid or {})
    if not combined:
        raise GridError("give a grid (such as r=4,16) or a search space")
    budget = {"steps": base_config.steps}
    if tokens is not None:
        if not is_int(tokens) or tokens < 1:
            raise GridError(f"tokens per trial must be a whole number > 0, got {short_repr(tokens)}")
        per_step = base_config.batch_size * base_config.seq_len if is_int(base_config.batch_size) else 0
        steps = math.ceil(tokens / per_step) if per_step else 0
        if not 1 <= steps <= MAX_STEPS:
            raise GridError(f"{tokens:,} tokens per trial is {steps:,} steps; a short run takes 1 to {MAX_STEPS:,}")
        base_config = dataclasses.replace(base_config, steps=steps)
        budget = {"tokens": tokens, "steps": steps}
    problems = base_config.problems()
    if problems:
        raise GridError(problems[0])
    trials = expand(combined, base_settings, base_config, seeds, config_name(base_config.model))
    label = (name or "").strip() or _default_name(combined, space, base_config)
    if problem := name_problem(label, "an experiment name"):
        raise GridError(problem)
    return ExperimentPlan(label, base_settings, base_config, combined, seeds, trials, space, budget)


def _default_name(grid: Grid, space: str | None, config: TrainConfig) -> str:
    varied = " x ".join(name for name in DIMENSIONS if name in grid and len(grid[name]) > 1) or "one config"
    prefix = f"{space} space" if space else varied
    return f"{prefix} on {config.dataset}"


def submit_experiment(
    store: Store,
    plan: ExperimentPlan,
    runner: str = "local",
    owner: str = WORKER,
    ray_address: str | None = None,
    asha: bool = False,
) -> int:
    """Check the plan's model and dataset (`training.preflight`), then write the experiment and one
    queued run per trial; returns the experiment id. `owner` is "worker" when the app's worker is
    to train them, "cli" when this process will (`run_local`, or a Ray driver here); `runner` "ray"
    runs them on the Ray cluster at `ray_address` ("auto": $RAY_ADDRESS or a local one), with ASHA
    early stopping when `asha` (the spec's `asha`, which the app's worker hands to `run_on_ray`).
    Raises `InputError` before anything is written."""
    from lora_core.training import preflight

    if runner not in ("local", "ray"):
        raise InputError(f"runner must be local or ray, not {short_repr(runner)}")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise InputError("give a Ray address (host:port, ray://host:port) or auto")
    preflight(plan.trials[0].config, plan.trials[0].settings)
    spec = plan.spec()
    if runner == "ray":
        spec["ray_address"] = (ray_address or "auto").strip()
        spec["asha"] = bool(asha)
    trials = [
        {
            "name": f"{plan.name} #{trial.index + 1}: {trial.label}",
            "model": trial.config.model,
            "dataset": trial.config.dataset,
            "settings": trial.settings.to_peft_dict(),
            "config": dataclasses.asdict(trial.config),
            "owner": owner,
            "trial": {"index": trial.index, "values": dict(trial.values), "note": trial.note},
        }
        for trial in plan.trials
    ]
    experiment_id = store.create_experiment(
        plan.name, plan.base_config.model, plan.base_config.dataset, spec, runner, trials
    )
    return experiment_id


def run_local(store: Store, experiment_id: int, base_models=None, on_trial=None) -> list:
    """Train the queued trials of an experiment in this process, one after another, on one loaded
    base model; returns their `RunResult`s. A trial that fails (NaN, out of memory) is recorded and
    the next one starts; a cancel of the experiment (from any process sharing the store) stops the
    trial in flight after its step and cancels the rest. Ctrl-C does the same (the trial in flight
    ends `cancelled`, its adapter saved), then raises KeyboardInterrupt."""
    from lora_core.runner import StoreCancel
    from lora_core.training.run import BaseModels, run_training

    models = base_models or BaseModels()
    results = []
    try:
        with ctrl_c_cancels(store, experiment_id):
            for run_id in _queued_trials(store, experiment_id):
                if store.experiment_cancel_requested(experiment_id):
                    break
                run = store.run(run_id)
                if run is None or run["status"] != "queued":
                    continue
                config = TrainConfig(**run["config"])
                settings = LoraSettings.from_peft_dict(run["settings"])
                cancel = StoreCancel(store, run_id)
                result = run_training(store, run_id, config, settings, cancel, base_models=models)
                results.append(result)
                if on_trial is not None:
                    on_trial(result)
    finally:
        if store.experiment_cancel_requested(experiment_id):
            store.cancel_experiment(experiment_id)  # trials still queued become cancelled
    return results


@contextlib.contextmanager
def ctrl_c_cancels(store: Store, experiment_id: int) -> Iterator[None]:
    """Ctrl-C cancels the experiment as the page's Cancel would (the trial in flight stops after
    its step and keeps its record, the rest are cancelled), then raises KeyboardInterrupt once the
    trials have wound down; a second Ctrl-C stops waiting. Off the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[threading.Thread] = []
    failed: list[str] = []

    def cancel() -> None:
        try:
            store.cancel_experiment(experiment_id)
        except Exception as error:  # reported once the trials have wound down, in one line
            failed.append(one_line(error))

    def on_ctrl_c(signum, frame) -> None:
        if pressed:
            raise KeyboardInterrupt
        # The handler runs on the main thread between two bytecodes, possibly inside one of this
        # thread's own store writes: writing here would wait on its own lock ("database is
        # locked"). A thread writes the cancel once the interrupted write has committed.
        writer = threading.Thread(target=cancel, daemon=True)
        pressed.append(writer)
        writer.start()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for writer in pressed:
            writer.join()
    if failed:
        print(f"experiment {experiment_id} could not be marked cancelled: {failed[0]}", file=sys.stderr)
    if pressed:
        raise KeyboardInterrupt


def _queued_trials(store: Store, experiment_id: int) -> list[int]:
    runs = store.experiment_runs(experiment_id)
    return [int(i) for i in runs.loc[runs["status"] == "queued", "id"]]


RESULT_COLUMNS = (
    "run_id",
    "trial",
    "label",
    "status",
    "trainable_params",
    "memory_estimate_mb",
    "peak_memory_mb",
    "initial_eval_loss",
    "final_train_loss",
    "final_eval_loss",
    "tokens_per_s",
    "train_seconds",
    "error",
    "trained_by",
)


def results(store: Store, experiment_id: int, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial, in grid order: its grid values (one column per varied dimension, and
    `seed`), status, trainable parameters, estimated and measured peak memory, losses, mean
    tokens/s (steps after the first), seconds from start to end, and why it failed."""

    runs = store.experiment_runs(experiment_id) if runs is None else runs
    rows: list[dict] = []
    rates = _mean_rates(store, [int(i) for i in runs["id"]]) if len(runs) else {}
    for run in runs.to_dict("records"):
        trial = trial_of(run)
        values = trial.get("values", {})
        started, finished = run.get("started"), run.get("finished")
        row = {
            "run_id": int(run["id"]),
            "trial": int(trial.get("index", len(rows))) + 1,
            "label": str(run["name"]).split(": ", 1)[-1],
            "status": run["status"],
            "trainable_params": run.get("trainable_params"),
            "memory_estimate_mb": run.get("memory_estimate_mb"),
            "peak_memory_mb": run.get("peak_memory_mb"),
            "initial_eval_loss": run.get("initial_eval_loss"),
            "final_train_loss": run.get("final_train_loss"),
            "final_eval_loss": run.get("final_eval_loss"),
            "tokens_per_s": rates.get(int(run["id"])),
            "train_seconds": finished - started if _number(started) and _number(finished) else None,
            "error": run.get("error"),
            "trained_by": run.get("trained_by"),
        }
        rows.append({**{name: _plain(value) for name, value in values.items()}, **row})
    frame = pd.DataFrame(rows)
    return frame if len(frame) else pd.DataFrame(columns=list(RESULT_COLUMNS))


def trial_of(run: Mapping[str, Any]) -> dict:
    """A run's trial record (index, grid values, note): decoded as `Store.run` gives it, or from
    the JSON a runs frame holds; {} for a run outside any experiment."""
    import json

    trial = run.get("trial")
    return json.loads(trial) if isinstance(trial, str) else dict(trial or {})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """A grid value as a table cell: None (LoRA+ off) reads "off"."""
    return "off" if value is None else value


def _mean_rates(store: Store, run_ids: list[int]) -> dict[int, float]:
    """Mean training tokens/s of each run over its steps after the first (which pays for warm-up)."""
    metrics = store.metrics(run_ids)
    train = metrics[(metrics["kind"] == "train") & (metrics["step"] > 1)]
    return {int(k): float(v) for k, v in train.groupby("run_id")["tokens_per_s"].mean().items()}


def varied_dimensions(frame: pd.DataFrame) -> list[str]:
    """The grid dimensions (and `seed`) that take more than one value in `frame`."""
    names = [*DIMENSIONS, "seed"]
    return [name for name in names if name in frame.columns and frame[name].astype(str).nunique() > 1]


def ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed trials grouped by config (every value but the seed), best mean final eval loss
    first: `eval_loss` (mean over seeds), `seed_spread` (max - min over seeds; None with one seed),
    `seeds`, `seeds_lost` (its trials that did not complete: a config ranked on fewer seeds),
    `trainable_params`, `peak_memory_mb`, `train_seconds` (means), `run_id` (the best seed's run)
    and `verdict`: "best", "not significant" (closer to the best than the larger of
    the two seed spreads) or "worse"; with one seed per config, "no seed spread"."""
    done = frame[(frame["status"] == "completed") & frame["final_eval_loss"].notna()] if len(frame) else frame
    config_columns = [name for name in DIMENSIONS if name in frame.columns]
    keys_all = config_columns or ["label"]
    lost = (
        frame[frame["status"] != "completed"].groupby([frame[c].astype(str) for c in keys_all]).size()
        if len(frame)
        else pd.Series(dtype=int)
    )
    if done.empty:
        return pd.DataFrame(columns=[*config_columns, "eval_loss", "seed_spread", "seeds", "verdict", "run_id"])
    keys = config_columns or ["label"]
    rows = []
    for _, group in done.groupby([done[c].astype(str) for c in keys], sort=False):
        losses = [float(v) for v in group["final_eval_loss"]]
        best = group.loc[group["final_eval_loss"].idxmin()]
        row = {name: best[name] for name in config_columns}
        row.update(
            eval_loss=statistics.fmean(losses),
            seed_spread=max(losses) - min(losses) if len(losses) > 1 else None,
            seeds=len(losses),
            trainable_params=best["trainable_params"],
            peak_memory_mb=group["peak_memory_mb"].mean(),
            train_seconds=group["train_seconds"].mean(),
            run_id=int(best["run_id"]),
            label=_config_label(best, config_columns),
            seeds_lost=int(
                lost.get(tuple(str(best[c]) for c in keys_all) if len(keys_all) > 1 else str(best[keys_all[0]]), 0)
            ),
        )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("eval_loss", kind="stable").reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    table["verdict"] = _verdicts(table)
    return table


def _config_label(row: pd.Series, columns: Sequence[str]) -> str:
    from lora_core.experiments.grid import trial_label

    return trial_label({name: (None if row[name] == "off" else row[name]) for name in columns}) or str(row["label"])


def _verdicts(table: pd.DataFrame) -> list[str]:
    best_loss = float(table["eval_loss"].iloc[0])
    best_spread = table["seed_spread"].iloc[0]
    verdicts = ["best"]
    for loss, spread in zip(table["eval_loss"].iloc[1:], table["seed_spread"].iloc[1:], strict=True):
        if best_spread is None or pd.isna(best_spread) or spread is None or pd.isna(spread):
            verdicts.append("no seed spread")
        elif float(loss) - best_loss < max(float(best_spread), float(spread)):
            verdicts.append("not significant")
        else:
            verdicts.append("worse")
    return verdicts


def pareto_front(frame: pd.DataFrame, cost: str, loss: str = "final_eval_loss") -> pd.Series:
    """Which rows no other row beats on both `cost` and `loss` (lower is better for both)."""
    valid = frame[cost].notna() & frame[loss].notna()
    points = frame.loc[valid, [cost, loss]].astype(float)
    front = pd.Series(False, index=frame.index)
    for index, (spent, reached) in points.iterrows():
        no_worse = (points[cost] <= spent) & (points[loss] <= reached)
        dominated = (no_worse & ((points[cost] < spent) | (points[loss] < reached))).any()
        front[index] = not dominated
    return front


def estimate_plan(store: Store | None, plan: ExperimentPlan, device: str | None = None) -> dict[str, Any]:
    """What the page shows before Start: `trials`, `largest_peak_mb` (the largest trial's estimated
    peak memory, None where it cannot be estimated) and `largest` (its label), `seconds` (the
    whole experiment's estimated wall time, None without history) with `basis` saying where that
    comes from: the median seconds per step of earlier completed runs in the store on this device,
    of the same model, batch size and sequence length when there are any, else of models within 4x
    of its size, scaled by parameters x tokens per step (the work of a step)."""
    from lora_core.devices import pick_device

    device = device or pick_device(plan.base_config.device)
    inv = _plan_inventory(plan)
    largest, largest_label = _largest_peak(plan, device, inv)
    seconds, basis = None, "no completed run on this device yet; the first trials will show the pace"
    if store is not None:
        per_step = _history_seconds_per_step(store, plan.base_config, device, inv.total_params if inv else None)
        if per_step is not None:
            value, count, scaled = per_step
            seconds = value * sum(trial.config.steps for trial in plan.trials)
            runs = f"{count} earlier run{'s' * (count != 1)} here"
            basis = (
                f"about {value:.2f} s per step, scaled by parameters x tokens per step from {runs}"
                if scaled
                else f"{value:.2f} s per step, the median of {runs} of this model, batch and length"
            )
    return {
        "trials": len(plan.trials),
        "largest_peak_mb": largest,
        "largest": largest_label,
        "seconds": seconds,
        "basis": basis,
    }


def _plan_inventory(plan: ExperimentPlan):
    import lora_core
    from lora_core.models import local_model_roots

    try:
        return lora_core.inventory(
            lora_core.resolve_model(config_name(plan.base_config.model), local_roots=local_model_roots())
        )
    except InputError:
        return None


def _largest_peak(plan: ExperimentPlan, device: str, inv) -> tuple[float | None, str]:
    from lora_core.memory import estimate_memory
    from lora_core.training.memory import memory_setup

    if device == "mps" or inv is None:
        return None, ""
    best: tuple[float | None, str] = (None, "")
    seen: set = set()
    for trial in plan.trials:
        key = (trial.settings, trial.config.batch_size, trial.config.seq_len)
        if key in seen:
            continue
        seen.add(key)
        try:
            setup = memory_setup(trial.config, trial.config.seq_len, device)
            peak = estimate_memory(inv, trial.settings, setup).peak_bytes / 2**20
        except InputError:
            continue
        if best[0] is None or peak > best[0]:
            best = (peak, trial.label)
    return best


def _history_seconds_per_step(
    store: Store, config: TrainConfig, device: str, params: int | None
) -> tuple[float, int, bool] | None:
    """(seconds per step, how many runs it comes from, whether it was scaled from other models or
    sizes) from this store's completed runs on `device`, or None."""
    import json

    runs = store.runs()
    if runs.empty:
        return None
    done = runs[(runs["status"] == "completed") & (runs["device"] == device)].head(500)
    same, work = [], []
    for run in done.to_dict("records"):
        run_config = json.loads(run["config"]) if isinstance(run["config"], str) else run["config"]
        steps, batch, seq = (run_config.get(key) for key in ("steps", "batch_size", "seq_len"))
        if not (steps and batch and seq and _number(run.get("started")) and _number(run.get("finished"))):
            continue
        per_step = (run["finished"] - run["started"]) / steps
        if run["model"] == config.model and batch == config.batch_size and seq == config.seq_len:
            same.append(per_step)
        # Only from models of a like size: a step of a far smaller one is mostly fixed costs
        # (evaluation, logging), which do not scale with its parameters.
        if _number(run.get("all_params")) and params and 0.25 <= run["all_params"] / params <= 4:
            work.append(per_step / (run["all_params"] * batch * seq))
    if same:
        return statistics.median(same), len(same), False
    if work and params:
        return statistics.median(work) * params * config.batch_size * config.seq_len, len(work), True
    return None


def experiment_progress(runs: pd.DataFrame, now: float | None = None) -> dict[str, Any]:
    """An experiment's trials (`trials`), how many ended (`finished`), the steps all of them will
    train (`steps_total`) and the wall time since the first started (`elapsed`, up to `now`)."""
    import json

    now = now or time.time()
    total = len(runs)
    finished = int(runs["status"].isin(FINISHED).sum()) if total else 0
    steps = 0
    for config in runs["config"] if total else []:
        data = json.loads(config) if isinstance(config, str) else config
        steps += int(data.get("steps", 0))
    started = runs["started"].dropna() if total else pd.Series(dtype=float)
    return {
        "trials": total,
        "finished": finished,
        "steps_total": steps,
        "elapsed": (now - float(started.min())) if len(started) else 0.0,
    }
