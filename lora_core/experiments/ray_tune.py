"""An experiment's trials as Ray Tune trials: `run_on_ray` drives them from this process.

A trial trains in a Ray worker process, perhaps on a machine that cannot reach the store's SQLite
file, so it writes nothing to the store itself: what `run_training` writes there (status, losses,
each step's metrics) goes to Tune as results instead (`TuneReportStore`), and a Tune callback in
the driver (`StoreWriter`) writes them into the store as they arrive, so a page shows a Ray trial
live exactly as a local one. The adapter files come back as a Tune checkpoint, which the driver
copies into the run's adapter folder: on a cluster of several machines, `storage_path` must be a
folder (or bucket) that every node reaches. A cancel in the store, of the experiment or of one
trial, from any process, stops the Tune trials (`CancelStopper` reads the flags in the driver).

Ray is an optional extra (`pip install "ray[tune]"`); importing this module imports it when it is
installed, and `run_on_ray` says how to install it when it is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lora_core.errors import InputError, one_line
from lora_core.experiments.engine import ctrl_c_cancels
from lora_core.settings import LoraSettings
from lora_core.store import ACTIVE, FINISHED, Store
from lora_core.training.config import TrainConfig

try:
    from ray.tune import Callback as _TuneCallback
    from ray.tune import Stopper as _TuneStopper
except ImportError:  # Ray is an optional extra: run_on_ray raises the one-line InputError
    _TuneCallback = _TuneStopper = object  # type: ignore[misc,assignment]

INSTALL_HINT = 'Ray is not installed: pip install "ray[tune]"'
# Run columns that name the process owning the run: that stays the driver, which is alive here and
# answers for the run, while the trial's worker may be on another machine (its pid means nothing here).
_OWNER_FIELDS = ("owner_pid", "owner_started", "owner_host")
# Tune's time axis for ASHA: the training step of an evaluation (before the last step).
ASHA_TIME = "eval_step"


@dataclass
class RaySummary:
    """How an experiment went on Ray: where it ran, what Ray itself cost, and each trial's time.

    `ray_start_s` is the time to start or join Ray (0 when the caller's Ray was already up),
    `tune_s` the time inside Tune (its trials' start-up included), `wall_s` the whole call;
    `trial_s` maps run id to that trial's training seconds (start to end, as its run records)."""

    address: str
    started_local: bool
    cpus: float
    gpus: float
    ray_start_s: float = 0.0
    tune_s: float = 0.0
    wall_s: float = 0.0
    trial_s: dict[int, float] = field(default_factory=dict)
    statuses: dict[int, str] = field(default_factory=dict)

    def overhead_ratio(self) -> float | None:
        """Wall time over the sum of the trials' training times (None when no trial trained):
        below 1 when trials ran side by side, and what Ray adds shows above the trials' own time."""
        total = sum(self.trial_s.values())
        return self.wall_s / total if total > 0 else None


def run_on_ray(
    store: Store,
    experiment_id: int,
    address: str = "auto",
    asha: bool = False,
    storage_path: str | None = None,
) -> RaySummary:
    """Train the queued trials of an experiment as Ray Tune trials, one CPU each (one GPU each when
    the cluster has GPUs), as many at once as the cluster holds; returns a `RaySummary`.

    `address`: "auto" joins the cluster of $RAY_ADDRESS, else a Ray already running on this
    machine, else starts a local Ray (all of this machine's CPUs, no dashboard) for this call
    only; "host:port" or "ray://host:port" joins that cluster. A Ray this process already started
    is used as it is. `asha` stops trials whose eval loss falls behind (ASHA on `eval_loss`,
    time in training steps): such a trial ends `cancelled` with the step in its error.
    `storage_path` is where Tune keeps checkpoints (default: the store's data dir; a folder or
    bucket every node reaches on a multi-machine cluster).

    This process owns the trials until they end (they become interrupted if it dies). Each trial
    ends finished: a failed trial (NaN loss, an exception) fails alone with its reason; a cancel
    of the experiment stops the trials in flight and cancels the rest. Raises `InputError` when
    Ray is missing, the cluster cannot be reached or the experiment has nothing to run."""
    started = time.perf_counter()
    if store.experiment(experiment_id) is None:
        raise InputError(f"there is no experiment {experiment_id}")
    claimed = _claimed_here(store, experiment_id)
    run_ids = store.take_experiment_runs(experiment_id)
    for run_id in claimed:
        # a worker claimed it to hand the experiment over here; it trains once its Tune trial starts
        store.update_run(run_id, status="queued", started=None)
    if not run_ids:
        raise InputError(f"experiment {experiment_id} has no queued trials")
    try:
        require_ray()
        specs = {run_id: _trial_spec(store, run_id) for run_id in run_ids}
        if asha:
            _check_asha(specs)
        import ray

        summary, owned = _connect(ray, address)
    except InputError as error:
        _end_leftovers(store, run_ids, f"Ray: {error}")
        raise
    summary.ray_start_s = time.perf_counter() - started
    tune_started = time.perf_counter()
    try:
        with _ctrl_c_cancels(store, experiment_id):
            _tune(store, experiment_id, specs, asha, storage_path)
    except Exception as error:
        _end_leftovers(store, run_ids, f"Ray Tune stopped: {one_line(error)}")
        raise
    finally:
        summary.tune_s = time.perf_counter() - tune_started
        _end_leftovers(store, run_ids, "its Ray trial ended without reporting how the run ended")
        if owned:
            ray.shutdown()
    summary.wall_s = time.perf_counter() - started
    summary.trial_s, summary.statuses = _trial_times(store, run_ids)
    return summary


def require_ray() -> None:
    """Raise the one-line `InputError` that says how to install Ray when `ray[tune]` is missing
    (what a caller checks before it submits an experiment to run on Ray)."""
    if _TuneCallback is object:
        raise InputError(INSTALL_HINT)


def check_ray(
    address: str, asha: bool = False, steps: int = 0, eval_every: int = 0, report_to: tuple[str, ...] = ()
) -> None:
    """What can be checked before an experiment for Ray is written, so bad input creates nothing:
    Ray installed, an explicit address (or $RAY_ADDRESS for "auto") answering, ASHA given
    evaluations before the last step, and TensorBoard given a folder that outlives the trial
    (a Ray trial's own data dir is temporary). Raises `InputError` in one line."""
    if "tensorboard" in report_to and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        raise InputError(
            "TensorBoard on Ray: set TENSORBOARD_LOGGING_DIR to a folder the workers keep (a trial's own is removed)"
        )
    require_ray()
    address = (address or "auto").strip()
    target = os.environ.get("RAY_ADDRESS", "").strip() if address == "auto" else address
    if target and (problem := _unreachable(target)) is not None:
        where = f"$RAY_ADDRESS ({target})" if address == "auto" else target
        raise InputError(f"cannot reach the Ray cluster at {where}: {problem}")
    if asha and eval_every >= steps:
        raise InputError("ASHA compares trials at evaluations before the last step: set eval_every below steps")


def _tune(store: Store, experiment_id: int, specs: dict[int, dict], asha: bool, storage_path: str | None) -> None:
    """One Tune trial per run, on the Ray this process is connected to; returns when all ended."""
    from ray import tune

    local_storage = storage_path is None or "://" not in storage_path
    root = Path(storage_path or store.data_dir / "ray").expanduser().resolve() if local_storage else None
    name = f"experiment-{experiment_id}-{os.getpid()}-{int(time.time())}"
    book = TrialBook()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, specs=specs), {"cpu": 1, "gpu": _gpus(specs)}),
        param_space={"run_id": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(scheduler=_asha(specs) if asha else None, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(root) if root is not None else storage_path,
            stop=CancelStopper(store, experiment_id, book),
            callbacks=[StoreWriter(store, book)],
            verbose=0,
        ),
    )
    try:
        # Tune prints tables and the path of a folder removed below; what matters reaches the store,
        # and the CLI's stdout is JSON.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            tuner.fit()
    finally:
        if root is not None:
            shutil.rmtree(root / name, ignore_errors=True)


@contextlib.contextmanager
def _ctrl_c_cancels(store: Store, experiment_id: int) -> Iterator[None]:
    """`engine.ctrl_c_cancels` with Tune's own SIGINT handler off: it would end the run and return
    as if it had finished."""
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        with ctrl_c_cancels(store, experiment_id):
            yield
    finally:
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


def _claimed_here(store: Store, experiment_id: int) -> list[int]:
    """Trials this process marked running without training them yet (the app's worker claims one
    trial of a Ray experiment, then hands the whole experiment to `run_on_ray`)."""
    runs = store.experiment_runs(experiment_id)
    mine = runs[(runs["status"] == "running") & (runs["owner_pid"] == os.getpid())]
    return [int(run_id) for run_id in mine["id"]]


def _trial_spec(store: Store, run_id: int) -> dict[str, dict]:
    """A trial's config and settings as a Ray worker receives them: a local model folder or
    dataset file is named by its absolute path, since a Tune trial runs in its own folder."""
    run = store.run(run_id) or {}
    config = dict(run.get("config") or {})
    model = Path(str(config.get("model", ""))).expanduser()
    if model.is_dir():
        config["model"] = str(model.resolve())
    dataset = str(config.get("dataset", ""))
    if dataset.startswith("upload:") and Path(dataset.removeprefix("upload:")).expanduser().is_file():
        config["dataset"] = "upload:" + str(Path(dataset.removeprefix("upload:")).expanduser().resolve())
    return {"config": config, "settings": dict(run.get("settings") or {})}


def _connect(ray: Any, address: str) -> tuple[RaySummary, bool]:
    """Join (or start) Ray as `run_on_ray` describes: (what it joined, whether this call did, so
    must leave it again). Raises `InputError` when it cannot."""
    if ray.is_initialized():
        return _summary(ray, "the Ray this process had started", started_local=False), False
    # Workers' output stays in their log files: the CLI prints JSON on stdout.
    quiet = {"log_to_driver": False, "logging_level": "warning"}
    address = (address or "auto").strip()
    from_env = os.environ.get("RAY_ADDRESS", "").strip()
    target = from_env if address == "auto" else address
    try:
        if not target:
            try:
                ray.init(address="auto", **quiet)
                return _summary(ray, "the Ray running on this machine", started_local=False), True
            except ConnectionError:  # no Ray running here: start one for this experiment
                ray.init(include_dashboard=False, **quiet)
                return _summary(ray, "a local Ray started for this experiment", started_local=True), True
        problem = _unreachable(target)
        if problem is None:
            ray.init(address=target, **quiet)
            return _summary(ray, target, started_local=False), True
    except (ConnectionError, ValueError, RuntimeError) as error:
        problem = one_line(error)
    where = f"$RAY_ADDRESS ({from_env})" if address == "auto" and from_env else (target or "this machine")
    raise InputError(f"cannot reach the Ray cluster at {where}: {problem}{_auth_hint(target)}")


def _auth_hint(target: str) -> str:
    """Ray 2.60 turns token authentication on for clusters it starts, but a client given an
    explicit address only sends a token when told to: then the connection fails as unreachable."""
    if not target or os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN"):
        return ""
    return (
        "; if the cluster uses token authentication (Ray's default for clusters it starts), set "
        "RAY_AUTH_MODE=token with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
    )


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at `address` (host:port or ray://host:port), or None when something
    does: `ray.init` itself retries an address where nothing listens for minutes."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return "give host:port or ray://host:port"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        return one_line(error)
    return None


def _summary(ray: Any, address: str, started_local: bool) -> RaySummary:
    resources = ray.cluster_resources()
    return RaySummary(address, started_local, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))


def _gpus(specs: dict[int, dict]) -> int:
    """One GPU per trial when the cluster has GPUs and no trial asks for another device."""
    import ray

    wants_other = any(spec["config"].get("device") in ("cpu", "mps") for spec in specs.values())
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 and not wants_other else 0


def _check_asha(specs: dict[int, dict]) -> None:
    steps = [int(spec["config"].get("steps", 0)) for spec in specs.values()]
    every = [int(spec["config"].get("eval_every", 0)) for spec in specs.values()]
    if min(every) >= min(steps):
        raise InputError("ASHA compares trials at evaluations before the last step: set eval_every below steps")


def _asha(specs: dict[int, dict]):
    """ASHA on the eval loss, its rungs at evaluation steps: the first after one evaluation
    interval, each next one twice as far (reduction factor 2, so half the trials go on)."""
    from ray.tune.schedulers import ASHAScheduler

    steps = max(int(spec["config"]["steps"]) for spec in specs.values())
    every = min(int(spec["config"]["eval_every"]) for spec in specs.values())
    return ASHAScheduler(
        time_attr=ASHA_TIME, metric="eval_loss", mode="min", max_t=steps, grace_period=every, reduction_factor=2
    )


def _end_leftovers(store: Store, run_ids: list[int], reason: str) -> None:
    """Give every trial still queued or running a finished status: cancelled when a cancel was
    asked for, else failed with `reason`."""
    for run_id in run_ids:
        run = store.run(run_id)
        if run is None or run["status"] not in ACTIVE:
            continue
        if store.cancel_requested(run_id):
            error = None if run["status"] == "running" else "cancelled before it started"
            store.update_run(run_id, status="cancelled", error=error, finished=time.time())
        else:
            store.update_run(run_id, status="failed", error=reason, finished=time.time())


def _trial_times(store: Store, run_ids: list[int]) -> tuple[dict[int, float], dict[int, str]]:
    runs = store.runs(run_ids)
    seconds, statuses = {}, {}
    for run in runs.to_dict("records"):
        statuses[int(run["id"])] = str(run["status"])
        if pd.notna(run["started"]) and pd.notna(run["finished"]):
            seconds[int(run["id"])] = float(run["finished"]) - float(run["started"])
    return seconds, statuses


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


class CancelStopper(_TuneStopper):
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


class StoreWriter(_TuneCallback):
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
