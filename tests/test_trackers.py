"""Runs and experiments report to MLflow and W&B (Trainer's `report_to`): each tracker run, read
back with the tracker's own reader, holds the losses the app's store recorded for that run, under
its name, ended. Nothing here touches the network: MLflow writes a local file store, W&B runs
offline (it never logs in), and both trackers' telemetry and error reporting are off."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_model import build_tiny_causal_lm
from tiny_model import tiny_train_config as tiny_config

from lora_core.experiments import parse_grid, plan_experiment, run_local, submit_experiment
from lora_core.settings import LoraSettings
from lora_core.store import CLI, Store
from lora_core.training import run_training

BASE = LoraSettings(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
Losses = dict[str, dict[int, float]]  # {"train" | "eval": {step: loss}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 refuses a file store unless told; its sqlite store needs SQLAlchemy, which the
    # skinny client does not bring.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    yield tmp_path / "wandb"
    import wandb

    wandb.teardown()  # stops its service process; the next test's settings are read afresh


def trained(model: Path, tmp_path: Path, tracker: str) -> tuple[Store, int]:
    """(store, run id) of one completed tiny run that reported to `tracker`."""
    store = Store.open(tmp_path / "data")
    config = tiny_config(model, report_to=(tracker,))
    run_id = store.create_run(tracker, config.model, config.dataset, BASE.to_peft_dict(), {}, owner=CLI)
    assert run_training(store, run_id, config, BASE).status == "completed"
    return store, run_id


def store_losses(store: Store, run_id: int) -> Losses:
    """The run's train and eval losses as the store recorded them, less the base model's eval at
    step 0 (which Trainer reports as `baseline_loss` at step 1)."""
    frame = store.metrics([run_id])
    frame = frame[frame["step"] > 0]
    return {
        kind: {int(step): float(loss) for step, loss in zip(rows["step"], rows["loss"], strict=True)}
        for kind, rows in frame.groupby("kind")
    }


def mlflow_runs(uri: str) -> dict[str, tuple[str, Losses]]:
    """{run name: (status, losses)} of every run in the MLflow store at `uri`, read with MLflow's
    own client."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return {
        run.info.run_name: (
            run.info.status,
            {
                kind: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for kind, key in (("train", "loss"), ("eval", "eval_loss"))
            },
        )
        for run in runs
    }


def wandb_runs(wandb_dir: Path) -> dict[str, tuple[int | None, Losses]]:
    """{run name: (exit code, None if never finished; losses)} of every offline run under
    `wandb_dir`, read from its log with W&B's own reader: `wandb leet inspect` prints a log's
    records as protobuf text, parsed here into W&B's own `Record` messages."""
    from google.protobuf import text_format
    from wandb.proto.wandb_internal_pb2 import Record

    runs = {}
    for log in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        text = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", str(log)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        records = [text_format.Parse(block, Record()) for block in re.split(r"^# record .*\n", text, flags=re.M)[1:]]
        name = next(record.run.display_name for record in records if record.HasField("run"))
        exit_code = next((record.exit.exit_code for record in records if record.HasField("exit")), None)
        runs[name] = (exit_code, _wandb_losses(records))
    return runs


def _wandb_losses(records: list) -> Losses:
    """Losses of a W&B run's history records: `train/loss` and `eval/loss` at `train/global_step`."""
    losses: Losses = {"train": {}, "eval": {}}
    for record in records:
        row = {"/".join(item.nested_key) or item.key: item.value_json for item in record.history.item}
        for kind in losses:
            if f"{kind}/loss" in row:
                losses[kind][int(row["train/global_step"])] = float(row[f"{kind}/loss"])
    return losses


def test_a_run_reports_the_losses_the_store_recorded_to_mlflow(tiny_model, tmp_path, mlflow_uri) -> None:
    store, run_id = trained(tiny_model, tmp_path, "mlflow")
    assert mlflow_runs(mlflow_uri) == {f"run-{run_id}": ("FINISHED", store_losses(store, run_id))}


def test_a_run_reports_the_losses_the_store_recorded_to_wandb_offline(tiny_model, tmp_path, wandb_dir) -> None:
    store, run_id = trained(tiny_model, tmp_path, "wandb")
    assert wandb_runs(wandb_dir) == {f"run-{run_id}": (0, store_losses(store, run_id))}


def test_each_trial_of_an_experiment_reports_to_a_tracker_run_of_its_own(
    tiny_model, tmp_path, mlflow_uri, wandb_dir
) -> None:
    """Trials train one after another in one process: W&B's callback never finishes its run, so
    without the run ending it, the second trial logged into the first one's run."""
    store = Store.open(tmp_path / "data")
    plan = plan_experiment(BASE, tiny_config(tiny_model, report_to=("mlflow", "wandb")), parse_grid(["r=2,4"]))
    trials = {
        f"run-{o.run_id}": store_losses(store, o.run_id)
        for o in run_local(store, submit_experiment(store, plan, owner=CLI))
    }
    assert len(trials) == 2 and mlflow_runs(mlflow_uri) == {
        name: ("FINISHED", losses) for name, losses in trials.items()
    }
    assert wandb_runs(wandb_dir) == {name: (0, losses) for name, losses in trials.items()}
