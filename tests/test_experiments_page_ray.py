"""ASHA early stopping for an experiment the app's worker drives on Ray: the worker hands the
experiment's stored choice to `run_on_ray` (off for an experiment stored without one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lora_core import runner
from lora_core.experiments import ray_tune
from lora_core.settings import LoraSettings
from lora_core.store import WORKER, Store
from lora_core.training.config import TrainConfig


def ray_experiment(store: Store, spec: dict) -> int:
    """A Ray experiment of two queued trials, stored as the page stores one."""
    trials = [
        {
            "name": f"asha #{index + 1}: r={r}",
            "model": "embedded",
            "dataset": "json_extraction",
            "settings": LoraSettings(r=r, lora_alpha=2 * r).to_peft_dict(),
            "config": dataclasses.asdict(TrainConfig(steps=6, eval_every=2)),
            "owner": WORKER,
            "trial": {"index": index, "values": {"r": r}, "note": ""},
        }
        for index, r in enumerate((2, 4))
    ]
    return store.create_experiment("asha", "embedded", "json_extraction", spec, "ray", trials)


@pytest.mark.parametrize(
    ("spec", "handed"),
    [
        ({"ray_address": "10.0.0.7:6379", "asha": True}, ("10.0.0.7:6379", True)),
        ({"ray_address": "auto", "asha": False}, ("auto", False)),
        ({"ray_address": "auto"}, ("auto", False)),  # stored before the page offered ASHA
    ],
)
def test_the_worker_hands_the_stored_asha_choice_to_run_on_ray(
    tmp_path: Path, monkeypatch, spec: dict, handed: tuple
) -> None:
    got: list[tuple] = []

    def fake_run_on_ray(store, experiment_id, address="auto", asha=False, storage_path=None):
        got.append((experiment_id, address, asha))

    # the worker imports run_on_ray from ray_tune when it drives an experiment: patched there, it
    # is what the worker calls (a real run_on_ray would fail these trials, or start a Ray)
    monkeypatch.setattr(ray_tune, "run_on_ray", fake_run_on_ray)
    store = Store.open(tmp_path)
    experiment_id = ray_experiment(store, spec)
    runner._drive_on_ray(store, store.experiment(experiment_id))
    assert got == [(experiment_id, *handed)]
    assert list(store.experiment_runs(experiment_id)["status"]) == ["queued", "queued"]  # nothing failed
