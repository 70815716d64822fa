"""The Tune side of an experiment on Ray: what runs in a Ray worker and what Tune calls in the driver.

In the worker, `train_trial` (the Tune trainable) trains one run with `run_training`, which writes
to a `TuneReportStore`: each write becomes a Tune result, the adapter folder a Tune checkpoint.
In the driver, `StoreWriter` (a Tune callback) writes those results into the run store as they
arrive, and `CancelStopper` (a Tune stopper) stops trials whose run or experiment was cancelled;
the two share a `TrialBook`. `ray_tune.run_on_ray` wires them into a `Tuner`.

Ray pickles `train_trial` by reference, so every Ray worker imports this module by its path.
Ray is an optional extra: without it, importing this module still works (the Tune base classes
are then plain `object`, which is how `ray_tune.require_ray` tells that Ray is missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import one_line
from lora_core.settings import LoraSettings
from lora_core.store import ACTIVE, FINISHED, Store
from lora_core.training.config import TrainConfig

try:
    from ray.tune import Callback as TuneCallback
    from ray.tune import Stopper as TuneStopper
except ImportError:  # Ray is an optional extra: ray_tune.require_ray raises the one-line InputError
    TuneCallback = TuneStopper = object  # type: ignore[misc,assignment]

# Run columns that name the process owning the run: that stays the driver, which is alive here and
# answers for the run, while the trial's worker may be on another machine (its pid means nothing here).
_OWNER_FIELDS = ("owner_pid", "owner_started", "owner_host")
# Tune's time axis for ASHA: the training step of an evaluation (before the last step).
ASHA_TIME = "eval_step"


# ---- in the Ray worker


_models_lock = threading.Lock()
_models: Any = None  # this worker's BaseModels: Tune reuses the worker for the next trial, model loaded


def train_trial(config: dict, specs: dict[int, dict]) -> None:
    """The Tune trainable: train run `config["run_id"]` in this Ray worker with `run_training`,
    its writes sent to the driver as Tune results."""
    from lora_core.training.run import BaseModels, run_training

    global _models
    with _models_lock:
        _models = _models or BaseModels()
    run_id = int(config["run_id"])
    spec = specs[run_id]
    train_config = TrainConfig(**spec["config"])
    folder = Path(tempfile.mkdtemp(prefix=f"lora-explorer-ray-run-{run_id}-"))
    try:
        writer = TuneReportStore(folder, run_id, _worker_name(), train_config.steps)
        settings = LoraSettings.from_peft_dict(spec["settings"])
        run_training(writer, run_id, train_config, settings, base_models=_models)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _worker_name() -> str:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return f"ray worker pid {os.getpid()} on {socket.gethostname()} (node {node[:12]})"


class TuneReportStore:
    """What `run_training` writes to inside a Ray worker: each `update_run` / `add_metric` becomes
    one Tune result (with the latest eval loss, Tune's metric), and the adapter folder a
    checkpoint. Files (adapter, scratch) go to a folder of this worker's own."""

    def __init__(self, data_dir: Path, run_id: int, trained_by: str, steps: int) -> None:
        self.data_dir, self.run_id, self.trained_by, self.steps = data_dir, run_id, trained_by, steps
        self.eval_loss: float | None = None

    adapter_dir = Store.adapter_dir

    def scratch_dir(self, run_id: int) -> Path:
        path = self.data_dir / "scratch" / f"run-{run_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def update_run(self, run_id: int, **fields: Any) -> None:
        from ray import tune

        fields = {name: value for name, value in fields.items() if name not in _OWNER_FIELDS}
        if "trained_by" in fields:
            fields["trained_by"] = self.trained_by
        checkpoint = tune.Checkpoint.from_directory(fields["adapter_dir"]) if fields.get("adapter_dir") else None
        self._report({"update": fields}, checkpoint)

    def add_metric(self, run_id: int, kind: str, step: int, **values: float | int | None) -> None:
        result: dict[str, Any] = {"metric": {"kind": kind, "step": step, **values}}
        if kind == "eval":
            self.eval_loss = values.get("loss")
            if 0 < step < self.steps:  # ASHA judges trials in flight, never at their last step
                result[ASHA_TIME] = step
        self._report(result)

    def _report(self, result: dict[str, Any], checkpoint=None) -> None:
        from ray import tune

        tune.report({**result, "run_id": self.run_id, "eval_loss": self.eval_loss}, checkpoint=checkpoint)


# ---- in the driver


@dataclass
class TrialBook:
    """What the driver's stopper and callback share: the runs stopped on a cancel, and the last
    train loss and eval point each run reported (a stopped trial keeps them as its final losses)."""

    cancelled: set[int] = field(default_factory=set)
    last_train: dict[int, float | None] = field(default_factory=dict)
    last_eval: dict[int, float | None] = field(default_factory=dict)


class CancelStopper(TuneStopper):
    """Stops a trial whose run has a cancel request, and the whole Tune run once the experiment
    has one (read at most twice a second)."""

    def __init__(self, store: Store, experiment_id: int, book: TrialBook, every: float = 0.5) -> None:
        self.store, self.experiment_id, self.book, self.every = store, experiment_id, book, every
        self._checked, self._all = float("-inf"), False

    def __call__(self, trial_id: str, result: dict) -> bool:
        run_id = int(result["run_id"])
        if self.store.cancel_requested(run_id):
            self.book.cancelled.add(run_id)
            return True
        return False

    def stop_all(self) -> bool:
        if not self._all and time.monotonic() - self._checked >= self.every:
            self._checked = time.monotonic()
            self._all = self.store.experiment_cancel_requested(self.experiment_id)
        return self._all


class StoreWriter(TuneCallback):
    """Writes each Tune result of a trial into its run in the store as it arrives; when a trial
    ends without having written its outcome (stopped by a cancel or by ASHA, or its worker died),
    writes what happened."""

    def __init__(self, store: Store, book: TrialBook) -> None:
        self.store, self.book = store, book
        self.done: set[int] = set()
        self.held: dict[int, dict] = {}  # a run's last update, until its adapter checkpoint is copied
        self.early: dict[int, int] = {}  # run id -> the step at which ASHA stopped it

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = int(result["run_id"])
        if run_id in self.done:
            return
        if "metric" in result:
            self._add_metric(run_id, dict(result["metric"]))
        if "update" in result:
            self._update(run_id, dict(result["update"]))
        if result.get("done") and run_id not in self.book.cancelled and ASHA_TIME in result:
            self.early[run_id] = int(result[ASHA_TIME])

    def _add_metric(self, run_id: int, metric: dict) -> None:
        kind, step = metric.pop("kind"), int(metric.pop("step"))
        self.store.add_metric(run_id, kind, step, **metric)
        if kind == "train":
            self.book.last_train[run_id] = metric.get("loss")
        elif kind == "eval":
            self.book.last_eval[run_id] = metric.get("loss")

    def _update(self, run_id: int, fields: dict) -> None:
        if fields.get("status") == "running":
            run = self.store.run(run_id)
            if run is None or run["status"] in FINISHED:  # cancelled while it waited for a worker
                self.done.add(run_id)
                return
        if fields.get("adapter_dir"):
            self.held[run_id] = fields
            return
        self.store.update_run(run_id, **fields)
        if fields.get("status") in FINISHED:
            self.done.add(run_id)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        run_id = int(trial.config["run_id"])
        fields = self.held.pop(run_id, None)
        if fields is None:
            return
        target = self.store.adapter_dir(run_id)
        shutil.rmtree(target, ignore_errors=True)
        try:
            checkpoint.to_directory(str(target))
            fields["adapter_dir"] = str(target)
        except (OSError, ValueError) as error:
            fields["adapter_dir"] = None
            fields["error"] = f"the adapter files did not reach this machine ({one_line(error)}): {_SHARED_HINT}"
        self.store.update_run(run_id, **fields)
        self.done.add(run_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(int(trial.config["run_id"]), None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(int(trial.config["run_id"]), _trial_error(trial))

    def _end(self, run_id: int, error: str | None) -> None:
        """A trial ended: write its outcome unless it wrote one itself."""
        if run_id in self.done:
            return
        self.done.add(run_id)
        held = self.held.pop(run_id, None)
        if held is not None:  # it finished, but its adapter checkpoint never came
            held.update(adapter_dir=None, error=f"the adapter files did not reach this machine: {_SHARED_HINT}")
            self.store.update_run(run_id, **held)
            return
        run = self.store.run(run_id)
        if run is None or run["status"] not in ACTIVE:
            return
        eval_loss = self.book.last_eval.get(run_id)
        fields: dict[str, Any] = {
            "finished": time.time(),
            "final_eval_loss": eval_loss,
            "final_train_loss": self.book.last_train.get(run_id),
        }
        if run_id in self.book.cancelled or self.store.cancel_requested(run_id):
            fields.update(
                status="cancelled", error=None if run["status"] == "running" else "cancelled before it started"
            )
        elif error is not None:
            fields.update(status="failed", error=f"Ray: {error}")
        elif run_id in self.early:
            loss = f" (eval loss {eval_loss:.4g})" if isinstance(eval_loss, float) else ""
            fields.update(
                status="cancelled",
                error=f"stopped early by ASHA at step {self.early[run_id]}{loss}: not in the better half of the trials there",
            )
        else:
            fields.update(status="failed", error="its Ray trial ended without reporting how the run ended")
        self.store.update_run(run_id, **fields)


_SHARED_HINT = "give run_on_ray a storage_path that every Ray node reaches"


def _trial_error(trial) -> str:
    """The first line of the error Tune recorded for a failed trial (its worker died, mostly:
    `run_training` itself records every exception of a run)."""
    with contextlib.suppress(OSError, TypeError):
        lines = Path(trial.error_file).read_text().splitlines()
        found = [line.strip() for line in lines if line.strip() and not line.startswith("Failure #")]
        if found:
            return found[0]
    return "its Ray worker ended"
