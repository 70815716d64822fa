"""The run's `StoreCallback` driven by hand with transformers' own TrainerState / TrainerControl:
what it writes to the store for each log line, and when it tells the Trainer to stop."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from transformers import TrainerControl, TrainerState

from lora_core.store import Store
from lora_core.training.callback import StoreCallback


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.open(tmp_path / "data")


def started(store: Store, cancel: threading.Event | None = None) -> tuple[StoreCallback, TrainerState, int]:
    run_id = store.create_run("callback", "m", "d", {}, {})
    callback = StoreCallback(store, run_id, cancel or threading.Event())
    state = TrainerState()
    callback.on_train_begin(None, state, TrainerControl())
    return callback, state, run_id


def log_step(callback: StoreCallback, state: TrainerState, step: int, tokens: int, **logs) -> TrainerControl:
    state.global_step, state.num_input_tokens_seen = step, tokens
    control = TrainerControl()
    callback.on_log(None, state, control, logs=logs)
    return control


def test_each_step_and_eval_is_stored_and_the_baseline_runs_once_after_step_one(store) -> None:
    callback, state, run_id = started(store)
    baselines = []

    def baseline() -> None:  # what the run's baseline does: Trainer.evaluate logs "baseline_loss"
        baselines.append(state.global_step)
        callback.on_log(None, state, TrainerControl(), logs={"baseline_loss": 3.0})

    callback.baseline = baseline
    log_step(callback, state, 1, 100, loss=2.5, learning_rate=1e-3, grad_norm=0.75)
    log_step(callback, state, 2, 160, loss=2.0, learning_rate=1e-3, grad_norm=0.5)
    log_step(callback, state, 2, 160, eval_loss=1.8)

    assert baselines == [1]
    metrics = store.metrics([run_id])
    train, evals = metrics[metrics["kind"] == "train"], metrics[metrics["kind"] == "eval"]
    assert train["step"].tolist() == [1, 2] and train["loss"].tolist() == [2.5, 2.0]
    assert train["tokens"].tolist() == [100, 160] and train["grad_norm"].tolist() == [0.75, 0.5]
    assert train["learning_rate"].tolist() == [1e-3, 1e-3] and (train["tokens_per_s"] > 0).all()
    assert evals["step"].tolist() == [0, 2] and evals["loss"].tolist() == [3.0, 1.8]
    assert store.run(run_id)["initial_eval_loss"] == 3.0
    assert callback.train_losses == [2.5, 2.0] and callback.eval_losses == [(0, 3.0), (2, 1.8)]
    assert callback.nan_step is None


def test_a_nan_loss_is_stored_empty_and_stops_training(store) -> None:
    callback, state, run_id = started(store)
    callback.baseline = lambda: pytest.fail("the baseline must not run after a NaN loss")
    control = log_step(callback, state, 1, 50, loss=float("nan"), learning_rate=1e-3, grad_norm=float("inf"))

    assert control.should_training_stop and callback.nan_step == 1
    row = store.metrics([run_id]).iloc[0]
    assert row["kind"] == "train" and pd.isna(row["loss"]) and pd.isna(row["grad_norm"])  # NULL in the store
    after = TrainerControl()
    callback.on_step_end(None, state, after)
    assert after.should_training_stop


def test_a_cancel_stops_training_at_the_end_of_the_step(store) -> None:
    cancel = threading.Event()
    callback, state, _ = started(store, cancel)
    going = TrainerControl()
    callback.on_step_end(None, state, going)
    assert not going.should_training_stop
    cancel.set()
    stopping = TrainerControl()
    assert callback.on_step_end(None, state, stopping) is stopping
    assert stopping.should_training_stop
