"""ASHA early stopping for an experiment the app's worker drives on Ray: the Experiments page
checks the choice as the CLI does and stores it in the experiment's spec (AppTest, with a run
manager that starts no worker), and the worker hands it to `run_on_ray` (off for an experiment
stored without one)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_core import runner
from lora_core.experiments import ray_tune
from lora_core.runner import RunManager
from lora_core.settings import LoraSettings
from lora_core.store import WORKER, Store
from lora_core.training.config import TrainConfig
from pages.common import resources


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


# --- the Experiments page: the choice, checked and stored -------------------------------------

APP = str(Path(__file__).resolve().parents[1] / "app.py")
ROWS = b"".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n" for i in range(20))


class QueueOnly(RunManager):
    """Queues runs and starts no worker: nothing here may train, or start a Ray."""

    def __init__(self, store) -> None:
        self.store = store


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # "auto" then needs no cluster to answer
    monkeypatch.setattr(resources, "RunManager", QueueOnly)
    return tmp_path / "data"


@pytest.fixture
def page(data_dir) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("pages/experiments.py").run()
    assert not at.exception, at.exception
    return at


def start(at: AppTest, runner: str, asha: bool, steps: int = 6, eval_every: int = 2) -> AppTest:
    at.radio(key="lx_exp_runner").set_value(runner)
    at.checkbox(key="lx_exp_asha").set_value(asha)
    at.number_input(key="lx_exp_steps").set_value(steps)
    at.number_input(key="lx_exp_eval_every").set_value(eval_every)
    at.button(key="lx_exp_start").click().run()
    assert not at.exception, at.exception
    return at


def test_asha_on_a_ray_cluster_is_stored_in_the_experiments_spec(page: AppTest, data_dir: Path) -> None:
    pytest.importorskip("ray")  # check_ray refuses a Ray experiment when Ray is not installed
    page.text_input(key="lx_exp_name").set_value("asha sweep")
    start(page, "A Ray cluster", asha=True)
    assert [s.value for s in page.success] == [
        "Experiment 1 queued: 4 trials of asha sweep with ASHA early stopping."
    ], [e.value for e in page.error]
    store = Store.open(data_dir)
    experiment = store.experiment(1)
    assert (experiment["runner"], experiment["spec"]["ray_address"], experiment["spec"]["asha"]) == (
        "ray",
        "auto",
        True,
    )
    assert "· Ray with ASHA" in next(m.value for m in page.markdown if m.value.startswith("**queued**"))
    start(page, "A Ray cluster", asha=False)
    assert store.experiment(2)["spec"]["asha"] is False
    assert "· Ray with ASHA" not in next(m.value for m in page.markdown if m.value.startswith("**queued**"))


@pytest.mark.parametrize(
    ("runner", "steps", "eval_every", "message"),
    [
        (
            "A Ray cluster", 10, 10,
            "ASHA compares trials at evaluations before the last step: set eval_every below steps",
        ),
        (
            "This server's worker", 6, 2,
            "ASHA early stopping runs on a Ray cluster: train on A Ray cluster, or clear ASHA",
        ),
    ],
)  # fmt: skip
def test_asha_it_cannot_use_is_one_line_and_stores_nothing(
    page: AppTest, data_dir: Path, runner: str, steps: int, eval_every: int, message: str
) -> None:
    if runner == "A Ray cluster":
        pytest.importorskip("ray")  # without it the refusal would be Ray's install hint
    page.radio(key="lx_exp_data_source").set_value("Upload JSONL/CSV")
    page.file_uploader(key="lx_exp_upload").set_value(("data.jsonl", ROWS, "application/json"))
    start(page, runner, asha=True, steps=steps, eval_every=eval_every)
    assert [e.value for e in page.error] == [f"Not started: {message}"]
    assert not page.success
    assert Store.open(data_dir).experiments().empty
    assert not (data_dir / "uploads").exists()  # not even the dataset it would have trained on
    assert page.checkbox(key="lx_exp_asha").value and page.number_input(key="lx_exp_steps").value == steps
