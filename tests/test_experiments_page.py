"""AppTest of the Experiments page: plan a grid, start one on a tiny model, and read a finished one
(written straight into a temporary store, no training) as Pareto charts, parallel coordinates and
a ranking; apply and export the best; cancel; a poll reads only what changed."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tiny_model import build_tiny_causal_lm

from lora_core import LoraSettings
from lora_core.devices import pick_device
from lora_core.store import Store
from lora_core.training.config import TrainConfig

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def open_page(name: str = "experiments") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def page(data_dir) -> AppTest:
    return open_page()


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def plan(at: AppTest) -> dict[str, str]:
    at.button(key="lx_exp_plan").click().run()
    assert not at.exception, at.exception
    return metrics(at)


def numbers(data) -> list[float]:
    """A plotly array as sent to the browser (numpy arrays go as typed base64 buffers)."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["bdata"]), data["dtype"]).tolist()
    return list(data)


def chart(at: AppTest, key: str) -> dict:
    return next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if key in c.proto.id)


# --- planning: trials, memory and time before anything starts ---------------------------------


def test_a_plan_states_trials_peak_memory_and_time_and_follows_the_grid(page: AppTest, data_dir: Path) -> None:
    first = plan(page)
    assert first["Trials"] == "4"  # Q,V | All linear x r=4,16
    peak = float(first["Largest trial's peak memory (estimated)"].removesuffix(" MiB").replace(",", ""))
    assert 900 < peak < 5000  # fp32 SmolLM2 weights alone are 513 MiB
    assert first["Wall time (estimated)"] == "unknown"
    assert any("no completed run on this device yet" in c.value for c in page.caption)
    assert "All linear r=16" in next(c.value for c in page.caption if c.value.startswith("Largest"))

    page.multiselect(key="lx_exp_ranks").set_value(["4", "8", "16"])
    page.number_input(key="lx_exp_seeds").set_value(2)
    assert plan(page)["Trials"] == "12"

    # one earlier run of the embedded model at this batch and length on this device: 2 s a step
    store = Store.open(data_dir)
    config = dataclasses.asdict(TrainConfig(steps=10, batch_size=4, seq_len=128))
    run_id = store.create_run("earlier", "embedded", "json_extraction", {}, config, owner="cli")
    store.update_run(run_id, status="completed", device=pick_device(), started=100.0, finished=120.0)
    assert plan(page)["Wall time (estimated)"] == "12 min"  # 12 trials x 30 steps x 2 s
    assert store.experiments().empty  # planning writes nothing


def test_a_bad_grid_value_is_one_line_and_keeps_every_input(page: AppTest, data_dir: Path) -> None:
    page.multiselect(key="lx_exp_ranks").set_value(["4", "abc"])
    page.multiselect(key="lx_exp_alphas").set_value(["2r", "8"])
    page.number_input(key="lx_exp_steps").set_value(7)
    page.button(key="lx_exp_start").click().run()
    assert not page.exception
    assert [e.value for e in page.error] == ["Not started: r='abc': a whole rank from 1 to 65536"]
    assert page.multiselect(key="lx_exp_ranks").value == ["4", "abc"]
    assert page.multiselect(key="lx_exp_alphas").value == ["2r", "8"]
    assert page.number_input(key="lx_exp_steps").value == 7
    assert Store.open(data_dir).experiments().empty
    page.multiselect(key="lx_exp_alphas").set_value(["0r"])
    page.multiselect(key="lx_exp_ranks").set_value(["4"])
    page.button(key="lx_exp_plan").click().run()
    assert len(page.error) == 1 and "alpha" in page.error[0].value and "2r" in page.error[0].value


def test_a_dataset_upload_is_checked_like_the_fine_tune_pages(page: AppTest, data_dir: Path) -> None:
    page.radio(key="lx_exp_data_source").set_value("Upload JSONL/CSV")
    page.file_uploader(key="lx_exp_upload").set_value(("../../notes.exe", b"hello", "application/octet-stream"))
    page.button(key="lx_exp_start").click().run()
    assert not page.exception, page.exception
    assert [e.value for e in page.error] == [
        "Not started: notes.exe: use a .jsonl, .json or .csv file (a JSONL or CSV dataset)"
    ]
    rows = b"".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n" for i in range(20))
    page.file_uploader(key="lx_exp_upload").set_value(("data.jsonl", rows, "application/json"))
    assert plan(page)["Trials"] == "4" and not page.error
    assert not (data_dir / "uploads").exists()  # a plan stores nothing; Start stores the checked file


def test_a_tracker_that_is_not_installed_is_refused_in_one_line(page: AppTest, data_dir: Path, monkeypatch) -> None:
    # wandb is installed for the tracker tests: hide it from the engine's check (training.trackers.tracker_problems)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    page.multiselect(key="lx_exp_report").set_value(["wandb"])
    page.button(key="lx_exp_start").click().run()
    assert [e.value for e in page.error] == [
        "Not started: `report_to`: wandb needs the wandb package: pip install wandb"
    ]
    assert Store.open(data_dir).experiments().empty


def test_a_ray_cluster_that_does_not_answer_is_named_before_anything_is_written(page: AppTest, data_dir) -> None:
    pytest.importorskip("ray")  # an optional extra for users; `make test` installs it
    page.radio(key="lx_exp_runner").set_value("A Ray cluster")
    page.text_input(key="lx_exp_ray").set_value("127.0.0.1:1")
    page.button(key="lx_exp_start").click().run()
    assert [e.value for e in page.error] == [
        "Not started: cannot reach the Ray cluster at 127.0.0.1:1: [Errno 111] Connection refused"
    ]
    assert Store.open(data_dir).experiments().empty and page.text_input(key="lx_exp_ray").value == "127.0.0.1:1"


def test_run_these_on_the_search_page_opens_the_experiments_page_with_that_space(data_dir) -> None:
    at = open_page("search")
    at.radio(key="lx_search_priority").set_value("efficiency").run()
    at.button(key="lx_search_run").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Experiments"
    assert at.radio(key="lx_exp_space").value == "efficiency"
    at.switch_page("pages/experiments.py")  # AppTest reruns the page it was told, not the one switched to
    assert plan(at)["Trials"] == "4"  # the article's efficiency grid: 4 configurations
    at.radio(key="lx_exp_space").set_value("balanced")
    assert plan(at)["Trials"] == "36"


# --- a finished experiment, written straight into the store -----------------------------------

# (r, seed) -> final eval loss. r=8 is best; r=16 is within the seeds' spread of it (not
# significant); r=4 is further from it than either spread (worse).
LOSSES = {(4, 0): 1.50, (4, 1): 1.52, (8, 0): 1.00, (8, 1): 1.10, (16, 0): 1.08, (16, 1): 1.12}


def finished_experiment(store: Store) -> int:
    spec = {"grid": {"r": [4, 8, 16]}, "space": None, "seeds": 2, "dimensions": ["r"], "budget": {"steps": 3}}
    experiment_id = store.create_experiment("r sweep", "embedded", "json_extraction", spec)
    for index, ((r, seed), loss) in enumerate(LOSSES.items()):
        settings = LoraSettings(r=r, lora_alpha=2 * r, target_modules=("q_proj", "v_proj"))
        config = dataclasses.asdict(TrainConfig(steps=3, seed=seed, learning_rate=2e-3))
        run_id = store.create_run(
            f"r sweep #{index + 1}: r={r} seed={seed}", "embedded", "json_extraction", settings.to_peft_dict(),
            config, owner="cli", experiment_id=experiment_id,
            trial={"index": index, "values": {"r": r, "seed": seed}, "note": ""},
        )  # fmt: skip
        for step in (1, 2, 3):
            store.add_metric(run_id, "train", step, loss=loss + 1 / step, tokens=512 * step, tokens_per_s=100.0)
        store.add_metric(run_id, "eval", 3, loss=loss)
        store.update_run(
            run_id, status="completed", final_eval_loss=loss, trainable_params=1000 * r,
            peak_memory_mb=400.0 + r, started=1000.0 + 10 * index, finished=1005.0 + 10 * index,
        )  # fmt: skip
    return experiment_id


def ranking(at: AppTest):
    return next(d.value for d in at.dataframe if "verdict" in d.value.columns)


def test_a_finished_experiment_shows_pareto_parallel_coordinates_and_a_ranking(page: AppTest, data_dir) -> None:
    finished_experiment(Store.open(data_dir))
    page.run()
    assert not page.exception, page.exception
    table = ranking(page)
    assert table["r"].tolist() == [8, 16, 4]
    assert table["verdict"].tolist() == ["best", "not significant", "worse"]
    assert table["eval_loss"].round(4).tolist() == [1.05, 1.10, 1.51]
    assert table["seed_spread"].round(4).tolist() == [0.10, 0.04, 0.02]

    pareto = chart(page, "lx_exp_pareto_trainable_params")
    front = next(t for t in pareto["data"] if t["name"] == "Pareto front")
    assert numbers(front["x"]) == [4000, 8000] and numbers(front["y"]) == [1.50, 1.00]
    assert {t["name"] for t in pareto["data"]} == {"r=4", "r=8", "r=16", "Pareto front"}  # coloured by r
    memory = chart(page, "lx_exp_pareto_peak_memory_mb")
    assert numbers(next(t for t in memory["data"] if t["name"] == "Pareto front")["x"]) == [404.0, 408.0]
    assert chart(page, "lx_exp_pareto_train_seconds")["layout"]["xaxis"]["title"]["text"] == "wall time (s)"

    parallel = chart(page, "lx_exp_parallel")["data"][0]
    assert parallel["type"] == "parcoords"
    axes = {d["label"]: numbers(d["values"]) for d in parallel["dimensions"]}
    assert list(axes) == ["r", "trainable params", "final eval loss"]
    assert sorted(zip(axes["r"], axes["final eval loss"])) == sorted((r, loss) for (r, _), loss in LOSSES.items())

    curves = chart(page, "lx_exp_curves")
    assert len([t for t in curves["data"] if t["mode"] == "lines"]) == 6  # one train curve per trial
    progress = page.get("progress")[0].proto.text
    assert progress.startswith("6/6 trials done · step 18/18")


def test_colour_by_and_small_multiples_redraw_the_curves(page: AppTest, data_dir) -> None:
    finished_experiment(Store.open(data_dir))
    page.run()
    names = {t["name"] for t in chart(page, "lx_exp_curves")["data"]}
    assert names == {"r=4", "r=8", "r=16"}
    page.selectbox(key="lx_exp_colour").set_value("seed").run()
    assert {t["name"] for t in chart(page, "lx_exp_curves")["data"]} == {"seed=0", "seed=1"}
    page.radio(key="lx_exp_layout").set_value("small multiples").run()
    panels = {t.get("xaxis", "x") for t in chart(page, "lx_exp_curves")["data"]}
    assert panels == {"x", "x2", "x3", "x4", "x5", "x6"}  # one panel per trial


def test_apply_the_best_puts_its_settings_in_the_sidebar(page: AppTest, data_dir) -> None:
    finished_experiment(Store.open(data_dir))
    page.run()
    assert (page.slider(key="lx_r").value, page.selectbox(key="lx_strategy").value) == (16, "All attention")
    page.button(key="lx_exp_apply_best").click().run()
    assert not page.exception, page.exception
    assert page.slider(key="lx_r").value == 8
    assert page.number_input(key="lx_alpha").value == 16.0
    assert page.selectbox(key="lx_strategy").value == "Q,V"
    assert page.session_state["lx_spec"].model_id == "HuggingFaceTB/SmolLM2-135M"
    notice = next(s.value for s in page.success if "settings are in the sidebar" in s.value)
    assert notice.startswith("Trial 3's settings") and "learning rate 0.002" in notice


def test_export_the_best_opens_the_export_page_with_its_settings(page: AppTest, data_dir) -> None:
    finished_experiment(Store.open(data_dir))
    page.run()
    assert page.get("download_button")  # the best's adapter_config.json
    page.button(key="lx_exp_best_export").click().run()
    assert not page.exception, page.exception
    assert page.title[0].value == "Export"
    peft = json.loads(page.code[0].value)
    assert (peft["r"], peft["lora_alpha"], sorted(peft["target_modules"])) == (8, 16, ["q_proj", "v_proj"])


def test_delete_removes_a_finished_experiment_and_its_trials(page: AppTest, data_dir) -> None:
    store = Store.open(data_dir)
    experiment_id = finished_experiment(store)
    page.run()
    page.button(key="lx_exp_delete").click().run()
    assert not page.exception, page.exception
    assert store.experiment(experiment_id) is None and store.runs().empty
    assert any("No experiments yet" in c.value for c in page.caption)


# --- a running experiment: cancel, and a poll that reads only what changed ---------------------


def running_experiment(store: Store, trials: int = 3, points: int = 2) -> tuple[int, list[int]]:
    """An experiment whose first trial this test process trains (so no worker claims its trials and
    no reader marks them stranded) and whose other trials wait."""
    spec = {"grid": {"r": [4, 8, 16][:trials]}, "seeds": 1, "dimensions": ["r"]}
    experiment_id = store.create_experiment("live", "m", "reverse_list", spec)
    ids = []
    for index in range(trials):
        ids.append(
            store.create_run(
                f"live #{index + 1}: r={4 << index}", "m", "reverse_list", {}, {"steps": 100}, owner="cli",
                experiment_id=experiment_id, trial={"index": index, "values": {"r": 4 << index}},
            )
        )  # fmt: skip
    store.update_run(ids[0], status="running", owner_pid=os.getpid(), started=time.time())
    for step in range(1, points + 1):
        store.add_metric(ids[0], "train", step, loss=3.0 / step, tokens=64 * step, tokens_per_s=100.0, elapsed=step)
    return experiment_id, ids


def test_cancel_stops_a_running_experiment(page: AppTest, data_dir) -> None:
    store = Store.open(data_dir)
    experiment_id, ids = running_experiment(store)
    page.run()
    assert not page.button(key="lx_exp_cancel").disabled
    assert page.button(key="lx_exp_delete").disabled
    page.button(key="lx_exp_cancel").click().run()
    assert not page.exception, page.exception
    assert store.experiment(experiment_id)["status"] == "cancelling"  # the training trial stops after its step
    assert store.cancel_requested(ids[0])
    assert [store.run(i)["status"] for i in ids[1:]] == ["cancelled", "cancelled"]
    assert page.button(key="lx_exp_cancel").disabled


def test_a_poll_reads_only_the_new_points_of_the_shown_experiment(page: AppTest, data_dir, reads) -> None:
    store = Store.open(data_dir)
    finished_experiment(store)
    experiment_id, ids = running_experiment(store)
    page.run()
    assert page.selectbox(key="lx_exp_pick").value == experiment_id  # the newest is shown
    assert not page.exception, page.exception
    assert page.get("progress")[0].proto.text.startswith("0/3 trials done · step 2/300 · training trial 1")
    # the finished experiment's trials are never read; the training trial once in full, then its new points
    assert reads == [("metrics_since", {ids[0]: 0}, 2)], reads
    live = next(d.value for d in page.dataframe if "train loss" in d.value.columns)
    assert live["status"].tolist() == ["running", "queued", "queued"] and live["step"].iloc[0] == 2
    seen = int(store.metrics_since({ids[0]: 0})["seq"].max())  # the cursor the page holds
    store.add_metric(ids[0], "train", 3, loss=1.0, tokens=192, tokens_per_s=100.0, elapsed=3)
    reads.clear()
    page.run()
    assert reads == [("metrics_since", {ids[0]: seen}, 1)], reads
    curve = next(t for t in chart(page, "lx_exp_curves")["data"] if t["mode"] == "lines")
    assert numbers(curve["x"]) == [1, 2, 3]
    assert page.get("progress")[0].proto.text.startswith("0/3 trials done · step 3/300")
    page.selectbox(key="lx_exp_pick").set_value(experiment_id - 1).run()  # the finished one: results read it
    assert {name for name, *_ in reads} == {"metrics_since", "metrics"}


# --- a real experiment on a tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-experiments") / "model")


def test_start_trains_every_trial_and_ranks_them(page: AppTest, tiny_model: Path) -> None:
    page.radio(key="lx_exp_model_source").set_value("Hub id or local path")
    page.text_input(key="lx_exp_model_text").set_value(str(tiny_model))
    page.selectbox(key="lx_exp_task").set_value("reverse_list")
    page.multiselect(key="lx_exp_targets").set_value(["Q,V"])
    page.multiselect(key="lx_exp_ranks").set_value(["2", "4"])
    page.number_input(key="lx_exp_steps").set_value(3)
    page.number_input(key="lx_exp_eval_every").set_value(1)
    page.select_slider(key="lx_exp_seq").set_value(64)
    page.button(key="lx_exp_start").click().run()
    assert not page.exception, page.exception
    assert any("2 trials" in s.value for s in page.success), [s.value for s in page.success]
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not any("verdict" in d.value.columns for d in page.dataframe):
        time.sleep(0.5)
        page.run()  # timed fragment reruns never fire in AppTest
    table = ranking(page)
    assert sorted(table["r"].tolist()) == [2, 4] and table["eval_loss"].notna().all()
    assert page.get("progress")[0].proto.text.startswith("2/2 trials done · step 6/6")
    page.switch_page("pages/finetune.py").run()  # trials are ordinary runs
    runs = next(d.value for d in page.dataframe if "status" in d.value.columns)
    assert runs["status"].tolist() == ["completed", "completed"]
