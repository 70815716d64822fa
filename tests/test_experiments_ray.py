"""Experiments on Ray: trials run as Ray Tune trials in Ray's worker processes, and what they
write reaches the store through the driver. One local Ray (2 CPUs) serves the whole module, since
starting Ray and its workers (each imports torch) costs seconds on a small machine."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from tiny_model import build_nan_model, build_tiny_causal_lm
from tiny_model import tiny_train_config as tiny_config

from lora_core.errors import InputError
from lora_core.experiments import parse_grid, plan_experiment, results, submit_experiment
from lora_core.settings import LoraSettings
from lora_core.store import CLI, Store
from lora_core.training import TrainConfig

# make test installs ray[tune]; only a user running the suite without it skips this file
ray = pytest.importorskip("ray")
ray_tune = pytest.importorskip("lora_core.experiments.ray_tune")

BASE = LoraSettings(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module; run_on_ray uses a Ray this process started as it is."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    ray.shutdown()


def submit(store: Store, config: TrainConfig, grid: list[str]) -> int:
    plan = plan_experiment(BASE, config, parse_grid(grid))
    return submit_experiment(store, plan, runner="ray", owner=CLI)


def test_trials_run_in_ray_workers_and_their_metrics_reach_the_store(tiny_model, local_ray, tmp_path, capfd) -> None:
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model), ["r=2,3,4"])
    summary = ray_tune.run_on_ray(store, experiment_id)
    table = results(store, experiment_id)
    assert list(table["status"]) == ["completed"] * 3, list(table["error"])
    assert table["final_eval_loss"].notna().all() and table["initial_eval_loss"].notna().all()
    metrics = store.metrics(list(table["run_id"]))
    for run_id in table["run_id"]:
        mine = metrics[metrics["run_id"] == run_id]
        assert mine.loc[mine["kind"] == "train", "step"].tolist() == [1, 2, 3]
        assert mine.loc[mine["kind"] == "eval", "step"].tolist() == [0, 2, 3]
    workers = {int(text.split()[3]) for text in table["trained_by"]}  # "ray worker pid N on HOST (node ...)"
    assert all(text.startswith("ray worker pid ") for text in table["trained_by"])
    assert os.getpid() not in workers
    runs = store.experiment_runs(experiment_id)
    assert set(runs["owner_pid"]) == {os.getpid()}  # the driver answers for the trials
    assert all((Path(path) / "adapter_model.safetensors").is_file() for path in runs["adapter_dir"])
    assert all(Path(path).parent == store.data_dir / "adapters" for path in runs["adapter_dir"])
    assert store.experiment(experiment_id)["status"] == "completed"
    assert set(summary.trial_s) == set(table["run_id"]) and all(s > 0 for s in summary.trial_s.values())
    assert summary.overhead_ratio() is not None
    assert capfd.readouterr().out == ""  # the CLI prints JSON on stdout: Ray must keep out of it
    assert not (store.data_dir / "ray").exists() or not any((store.data_dir / "ray").iterdir())


def test_the_apps_worker_hands_a_ray_experiment_to_tune(tiny_model, local_ray, tmp_path) -> None:
    """The worker claims one trial, then drives the whole experiment on the cluster its spec names."""
    from lora_core.runner import RunManager

    store = Store.open(tmp_path)
    plan = plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=2,4"]))
    address = ray.get_runtime_context().gcs_address
    experiment_id = submit_experiment(store, plan, runner="ray", owner="worker", ray_address=address)
    manager = RunManager(store)
    try:
        for run_id in store.experiment_runs(experiment_id)["id"]:
            assert manager.wait(int(run_id), 180)["status"] == "completed"
    finally:
        manager.shutdown()
    runs = store.experiment_runs(experiment_id)
    assert runs["trained_by"].str.startswith("ray worker pid ").all()
    assert manager._process.pid not in {int(text.split()[3]) for text in runs["trained_by"]}


def test_auto_starts_a_quiet_local_ray_only_when_none_runs(monkeypatch) -> None:
    calls: list[dict] = []
    fake = FakeRay(calls, running=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    summary, owned = ray_tune._connect(fake, "auto")
    assert summary.started_local and owned
    assert calls == [
        {"address": "auto", "log_to_driver": False, "logging_level": "warning"},
        {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"},
    ]
    calls.clear()
    summary, owned = ray_tune._connect(FakeRay(calls, running=True), "auto")
    assert not summary.started_local and owned and len(calls) == 1


class FakeRay:
    """`ray.init` as it answers "auto" with or without a Ray running on this machine."""

    def __init__(self, calls: list[dict], running: bool) -> None:
        self.calls, self.running = calls, running

    def is_initialized(self) -> bool:
        return False

    def init(self, **options) -> None:
        self.calls.append(options)
        if options.get("address") == "auto" and not self.running:
            raise ConnectionError("Could not find any running Ray instance.")

    def cluster_resources(self) -> dict:
        return {"CPU": 2.0}


def test_a_nan_trial_fails_alone(tiny_model, local_ray, tmp_path) -> None:
    broken = build_nan_model(tiny_model, tmp_path / "nan-model")
    store = Store.open(tmp_path / "data")
    experiment_id = submit(store, tiny_config(tiny_model), ["r=2,3,4"])
    second = int(store.experiment_runs(experiment_id)["id"].iloc[1])
    config = store.run(second)["config"]
    store.update_run(second, config=json.dumps({**config, "model": str(broken)}))
    ray_tune.run_on_ray(store, experiment_id)
    table = results(store, experiment_id)
    assert list(table["status"]) == ["completed", "failed", "completed"], list(table["error"])
    assert "NaN" in table["error"].iloc[1]
    assert store.experiment(experiment_id)["status"] == "completed"


def test_cancelling_the_experiment_stops_the_trials_on_ray(tiny_model, local_ray, tmp_path) -> None:
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model, steps=2000, eval_every=1000), ["r=2,3,4"])

    def cancel_after_first_steps() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (store.metrics()["kind"] == "train").sum() >= 2:
                store.cancel_experiment(experiment_id)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_after_first_steps)
    canceller.start()
    ray_tune.run_on_ray(store, experiment_id)
    canceller.join()
    runs = store.experiment_runs(experiment_id)
    assert list(runs["status"]) == ["cancelled"] * 3
    assert store.experiment(experiment_id)["status"] == "cancelled"
    trained = store.metrics(list(runs["id"]))
    assert trained["step"].max() < 2000


def test_ctrl_c_cancels_the_experiment_then_raises(tiny_model, local_ray, tmp_path) -> None:
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model, steps=2000, eval_every=1000), ["r=2,3"])

    def ctrl_c_after_first_steps() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (store.metrics()["kind"] == "train").sum() >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    handler = signal.getsignal(signal.SIGINT)
    presser = threading.Thread(target=ctrl_c_after_first_steps)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        ray_tune.run_on_ray(store, experiment_id)
    presser.join()
    assert list(store.experiment_runs(experiment_id)["status"]) == ["cancelled"] * 2
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is the caller's again


def test_asha_stops_a_trial_behind_the_others_early(tiny_model, local_ray, tmp_path) -> None:
    """Trials 1 and 2 are the same config (same losses: neither is behind the other); trial 3
    learns nothing (lr 1e-7), so at ASHA's first rung (step 2) it is behind both and stops there."""
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model, steps=6, eval_every=2), ["lr=1e-2,2e-2,1e-7"])
    ids = [int(i) for i in store.experiment_runs(experiment_id)["id"]]
    config = store.run(ids[1])["config"]
    store.update_run(ids[1], config=json.dumps({**config, "learning_rate": 1e-2}))
    ray_tune.run_on_ray(store, experiment_id, asha=True)
    table = results(store, experiment_id)
    assert list(table["status"]) == ["completed", "completed", "cancelled"], list(table["error"])
    assert table["error"].iloc[2].startswith("stopped early by ASHA at step 2")
    stopped = store.metrics([ids[2]])
    assert stopped.loc[stopped["kind"] == "train", "step"].max() < 6
    assert table["final_eval_loss"].iloc[2] > table["final_eval_loss"].iloc[0]
    assert store.experiment(experiment_id)["status"] == "completed"


def test_asha_needs_an_evaluation_before_the_last_step(tiny_model, tmp_path) -> None:
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model, steps=4, eval_every=4), ["r=2,4"])
    with pytest.raises(InputError, match="eval_every below steps"):
        ray_tune.run_on_ray(store, experiment_id, asha=True)
    runs = store.experiment_runs(experiment_id)
    assert list(runs["status"]) == ["failed"] * 2 and runs["error"].str.contains("eval_every").all()


def test_a_missing_experiment_or_ray_is_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(InputError, match="no experiment 7"):
        ray_tune.run_on_ray(Store.open(tmp_path), 7)
    monkeypatch.setattr(ray_tune, "TuneCallback", object)
    with pytest.raises(InputError, match=r'^Ray is not installed: pip install "ray\[tune\]"$'):
        ray_tune.require_ray()


@pytest.mark.parametrize(
    ("address", "message"),
    [("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1"), ("nowhere", "give host:port")],
)
def test_an_unreachable_cluster_fails_the_trials_at_once(tiny_model, tmp_path, monkeypatch, address, message) -> None:
    """Nothing listens there: ray.init, which would retry such an address for minutes, is never called."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the module's Ray may be up meanwhile
    monkeypatch.setattr(ray, "init", lambda **options: pytest.fail(f"ray.init{options} was called"))
    store = Store.open(tmp_path)
    experiment_id = submit(store, tiny_config(tiny_model), ["r=2,4"])
    with pytest.raises(InputError, match=message):
        ray_tune.run_on_ray(store, experiment_id, address=address)
    runs = store.experiment_runs(experiment_id)
    assert list(runs["status"]) == ["failed"] * 2 and runs["error"].str.startswith("Ray: cannot reach").all()
