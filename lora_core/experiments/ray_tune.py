"""An experiment's trials as Ray Tune trials: `run_on_ray` drives them from this process.

A trial trains in a Ray worker process, perhaps on a machine that cannot reach the store's SQLite
file, so it writes nothing to the store itself: what `run_training` writes there (status, losses,
each step's metrics) goes to Tune as results instead (`TuneReportStore`), and a Tune callback in
the driver (`StoreWriter`) writes them into the store as they arrive, so a page shows a Ray trial
live exactly as a local one. The adapter files come back as a Tune checkpoint, which the driver
copies into the run's adapter folder: on a cluster of several machines, `storage_path` must be a
folder (or bucket) that every node reaches. A cancel in the store, of the experiment or of one
trial, from any process, stops the Tune trials (`CancelStopper` reads the flags in the driver).
Those Tune-side pieces, and `train_trial` (the trainable), are in `ray_trials`; this module joins
or starts Ray and drives the `Tuner`.

Ray is an optional extra (`pip install "ray[tune]"`); importing this module imports it when it is
installed, and `run_on_ray` says how to install it when it is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lora_core.errors import InputError, one_line
from lora_core.experiments.engine import ctrl_c_cancels
from lora_core.experiments.ray_trials import (
    ASHA_TIME,
    CancelStopper,
    StoreWriter,
    TrialBook,
    TuneCallback,
    train_trial,
)
from lora_core.store import ACTIVE, Store

INSTALL_HINT = 'Ray is not installed: pip install "ray[tune]"'


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
    if TuneCallback is object:
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
