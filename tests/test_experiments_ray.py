"""Experiments on Ray: trials run as Ray Tune trials in Ray's worker processes, and what they
write reaches the store through the driver. One local Ray (2 CPUs) serves the whole module, since
starting Ray and its workers (each imports torch) costs seconds on a small machine."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from tiny_model import build_tiny_causal_lm

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


def tiny_config(model: Path, **changes) -> TrainConfig:
    base = {
        "model": str(model),
        "dataset": "reverse_list",
        "steps": 3,
        "eval_every": 2,
        "eval_examples": 8,
        "batch_size": 2,
        "seq_len": 64,
        "learning_rate": 1e-2,
    }
    return TrainConfig(**{**base, **changes})


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


def test_a_nan_trial_fails_alone(tiny_model, local_ray, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
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
    started = time.monotonic()
    ray_tune.run_on_ray(store, experiment_id)
    canceller.join()
    runs = store.experiment_runs(experiment_id)
    assert list(runs["status"]) == ["cancelled"] * 3
    assert store.experiment(experiment_id)["status"] == "cancelled"
    trained = store.metrics(list(runs["id"]))
    assert trained["step"].max() < 2000 and time.monotonic() - started < 300


def test_without_queued_trials_or_ray_nothing_runs(tmp_path, monkeypatch) -> None:
    store = Store.open(tmp_path)
    with pytest.raises(InputError, match="no experiment 7"):
        ray_tune.run_on_ray(store, 7)
    monkeypatch.setattr(ray_tune, "_TuneCallback", object)
    with pytest.raises(InputError, match=r'pip install "ray\[tune\]"'):
        ray_tune.require_ray()
