"""Experiments: grids, their trials as runs under one record, one loaded model across trials, and
the `sweep` CLI. Tiny random models train in seconds; nothing touches the network."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny_model import build_tiny_causal_lm
from tiny_model import tiny_train_config as tiny_config

from lora_core.experiments import (
    GridError,
    engine,
    estimate_plan,
    pareto_front,
    parse_grid,
    plan_experiment,
    ranked,
    results,
    run_local,
    space_grid,
    submit_experiment,
)
from lora_core.settings import LoraSettings
from lora_core.store import CLI, Store
from lora_core.strategies import count_search_space
from lora_core.training import BaseModels, TrainConfig, run_training

BASE = LoraSettings(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


# --- grids -------------------------------------------------------------------------------------


def test_a_grid_expands_to_every_combination_with_alpha_relative_to_each_rank(tiny_model) -> None:
    grid = parse_grid(["r=2,8", "alpha=16,2r", "lr=1e-3|3e-3", "init=default,pissa", "loraplus=off,16"])
    plan = plan_experiment(BASE, tiny_config(tiny_model), grid, seeds=2)
    assert len(plan.trials) == 2 * 2 * 2 * 2 * 2 * 2
    relative = [t for t in plan.trials if t.values["alpha"] == "2r"]
    assert {(t.settings.r, t.settings.lora_alpha) for t in relative} == {(2, 4), (8, 16)}
    assert {t.config.learning_rate for t in plan.trials} == {1e-3, 3e-3}
    assert {t.config.seed for t in plan.trials} == {0, 1}
    assert {t.config.loraplus_ratio for t in plan.trials} == {None, 16.0}
    pissa = [t for t in plan.trials if t.values["init"] == "pissa"]
    assert all(t.settings.to_peft_config().init_lora_weights == "pissa" for t in pissa)
    assert all(t.settings.to_peft_config().init_lora_weights is True for t in plan.trials if t not in pissa)


def test_strategies_map_onto_the_models_own_module_names() -> None:
    # GPT-2 fuses q, k and v into c_attn: "Q,V" can only adapt that fused layer, and says so.
    grid = parse_grid(["targets=All attention|All linear|Q,V"])
    plan = plan_experiment(BASE, TrainConfig(model="openai-community/gpt2"), grid)
    assert [t.settings.target_modules for t in plan.trials] == [("attn.c_proj", "c_attn"), "all-linear", ("c_attn",)]
    assert "fused" in plan.trials[2].note


@pytest.mark.parametrize("space", ["efficiency", "balanced", "thorough"])
def test_the_articles_spaces_run_exactly_the_configurations_they_count(space) -> None:
    plan = plan_experiment(BASE, TrainConfig(), space=space)
    counted = count_search_space("HuggingFaceTB/SmolLM2-135M", space)
    assert len(plan.trials) == len(counted)
    planned = sorted((t.settings.r, t.settings.lora_alpha, t.settings.lora_dropout) for t in plan.trials)
    assert planned == sorted(
        zip(counted["r"], counted["lora_alpha"].astype(float), counted["lora_dropout"], strict=True)
    )
    assert set(space_grid(space)) == {"targets", "r", "alpha", "dropout"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["r=0"], "a rank from 1"),
        (["r=4.5"], "whole rank"),
        (["rank=99999999999999999999"], "from 1 to"),
        (["x=1"], "unknown name 'x'"),
        (["r"], "NAME=V1,V2"),
        (["r=4,,8"], "empty value"),
        (["r="], "empty value"),
        (["r=4", "rank=8"], "given twice"),
        (["targets=re:(("], "invalid regex"),
        (["targets=re:" + "a" * 5000], "regex of 1 to"),
        (["targets=../../etc/passwd"], "a strategy"),
        (["targets=q_proj\x00v_proj"], "a strategy"),
        (["alpha=-1"], "alpha must be > 0"),
        (["alpha=0r"], "factor"),
        (["lr=0"], "learning rate in (0, 1)"),
        (["lr=inf"], "learning rate"),
        (["dropout=nan"], "dropout in [0, 1)"),
        (["dora=maybe"], "true or false"),
        (["loraplus=0.5"], "LoRA+ ratio"),
        (["init=eva"], "data pass"),
        (["init=zeros"], "one of default"),
        (["\udcff=1"], "unknown name"),
    ],
)
def test_bad_grids_are_refused_in_one_line_naming_the_value(items, message) -> None:
    with pytest.raises(GridError) as error:
        parse_grid(items)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_too_many_trials_or_seeds_are_refused_before_anything_runs(tiny_model) -> None:
    ranks = ",".join(str(r) for r in range(1, 40))
    with pytest.raises(GridError, match="more than 512"):
        plan_experiment(BASE, tiny_config(tiny_model), parse_grid([f"r={ranks}", "dropout=0,0.1,0.2"]), seeds=5)
    with pytest.raises(GridError, match="seeds must be"):
        plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=4"]), seeds=0)
    with pytest.raises(GridError, match="tokens per trial"):
        plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=4"]), tokens=10**15)


def test_a_token_budget_becomes_steps_of_the_batch() -> None:
    plan = plan_experiment(BASE, TrainConfig(batch_size=4, seq_len=128), parse_grid(["r=4"]), tokens=5000)
    assert plan.trials[0].config.steps == math.ceil(5000 / 512) == 10
    assert plan.budget == {"tokens": 5000, "steps": 10}


def test_a_plan_shows_its_largest_peak_and_a_wall_time_from_this_stores_history(tmp_path) -> None:
    store = Store.open(tmp_path)
    plan = plan_experiment(BASE, TrainConfig(steps=10), parse_grid(["targets=Q,V|All linear", "r=4,64"]))
    before = estimate_plan(store, plan, device="cpu")
    assert before["trials"] == 4 and before["seconds"] is None
    assert before["largest"] == "All linear r=64" and before["largest_peak_mb"] > 0
    run_id = store.create_run("past", "embedded", "json_extraction", {}, {"batch_size": 4, "seq_len": 128, "steps": 20})
    store.update_run(run_id, status="completed", device="cpu", started=1000.0, finished=1050.0)
    after = estimate_plan(store, plan, device="cpu")
    assert after["seconds"] == pytest.approx(2.5 * 40) and "1 earlier run" in after["basis"]


def test_without_runs_of_the_model_the_time_is_scaled_from_other_models_by_their_work(tmp_path) -> None:
    import lora_core

    store = Store.open(tmp_path)
    config = {"batch_size": 2, "seq_len": 64, "steps": 10}
    run_id = store.create_run("other", "/some/model", "json_extraction", {}, config)
    params = lora_core.inventory(lora_core.resolve_model("HuggingFaceTB/SmolLM2-135M")).total_params
    store.update_run(run_id, status="completed", device="cpu", started=0.0, finished=30.0, all_params=params // 3)
    plan = plan_experiment(BASE, TrainConfig(steps=10, batch_size=4, seq_len=128), parse_grid(["r=4,8"]))
    estimate = estimate_plan(store, plan, device="cpu")
    per_step = 3.0 / (params // 3 * 2 * 64) * params * 4 * 128
    assert estimate["seconds"] == pytest.approx(per_step * 20) and "scaled by parameters" in estimate["basis"]
    assert estimate_plan(store, plan, device="cuda")["seconds"] is None  # another device's pace says nothing
    tiny = store.create_run("tiny", "/tiny", "json_extraction", {}, config)
    store.update_run(run_id, all_params=10_000)  # a model 13,000x smaller: its steps are mostly fixed costs
    store.update_run(tiny, status="completed", device="cpu", started=0.0, finished=30.0, all_params=10_000)
    assert estimate_plan(store, plan, device="cpu")["seconds"] is None


# --- ranking -----------------------------------------------------------------------------------


def _frame(rows) -> pd.DataFrame:
    keys = ("r", "seed", "final_eval_loss", "trainable_params")
    frame = pd.DataFrame([dict(zip(keys, row, strict=True)) for row in rows])
    frame["status"], frame["label"] = "completed", ""
    frame["run_id"] = range(1, len(frame) + 1)
    frame["peak_memory_mb"], frame["train_seconds"] = 100.0, 10.0
    return frame


def test_a_difference_inside_the_seed_spread_is_not_significant() -> None:
    table = ranked(
        _frame(
            [
                (4, 0, 1.00, 10),
                (4, 1, 1.10, 10),
                (8, 0, 1.05, 20),
                (8, 1, 1.13, 20),
                (16, 0, 2.0, 40),
                (16, 1, 2.01, 40),
            ]
        )
    )
    assert list(table["r"]) == [4, 8, 16]
    assert list(table["verdict"]) == ["best", "not significant", "worse"]
    assert table["eval_loss"].iloc[0] == pytest.approx(1.05) and table["seed_spread"].iloc[0] == pytest.approx(0.10)
    one_seed = ranked(_frame([(4, 0, 1.0, 10), (8, 0, 1.2, 20)]))
    assert list(one_seed["verdict"]) == ["best", "no seed spread"]


def test_a_config_that_lost_seeds_says_so() -> None:
    frame = _frame([(4, 0, 1.0, 10), (4, 1, 1.0, 10), (8, 0, 1.1, 20), (8, 1, 1.2, 20)])
    frame.loc[1, ["status", "final_eval_loss"]] = ["failed", None]
    table = ranked(frame)
    assert list(zip(table["r"], table["seeds"], table["seeds_lost"], strict=True)) == [(4, 1, 1), (8, 2, 0)]


def test_the_pareto_front_keeps_only_undominated_trials() -> None:
    frame = _frame([(4, 0, 1.0, 10), (8, 0, 0.9, 20), (16, 0, 0.95, 40), (32, 0, 0.8, 80)])
    assert list(pareto_front(frame, "trainable_params")) == [True, True, False, True]


# --- trials on one loaded model ----------------------------------------------------------------


def test_trials_are_runs_grouped_under_one_experiment_and_share_one_loaded_model(tiny_model, tmp_path) -> None:
    store = Store.open(tmp_path)
    plan = plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=2,4", "targets=q_proj+v_proj|All linear"]))
    experiment_id = submit_experiment(store, plan, owner=CLI)
    models = BaseModels()
    outcomes = run_local(store, experiment_id, base_models=models)
    assert [o.status for o in outcomes] == ["completed"] * 4
    assert models.loads == 1
    table = results(store, experiment_id)
    assert list(table["status"]) == ["completed"] * 4 and table["final_eval_loss"].notna().all()
    assert list(table["trainable_params"])[:2] == [512, 1024]  # q,v on 2 layers of width 32: 2*2*r*(32+32)
    runs = store.runs()
    assert set(runs["experiment_id"]) == {experiment_id}  # ordinary runs: the Fine-tune page lists them
    experiment = store.experiment(experiment_id)
    assert experiment["status"] == "completed" and experiment["trials"] == 4 and experiment["completed"] == 4
    assert all(Path(path).is_dir() for path in runs["adapter_dir"])


def test_a_trial_after_others_starts_as_a_fresh_run_would(tiny_model, tmp_path) -> None:
    """PiSSA rewrites the base weights and an earlier trial's adapter was trained: the last trial,
    on the same loaded model, must match a run in a fresh process step for step."""
    store = Store.open(tmp_path / "experiment")
    grid = parse_grid(["init=pissa,gaussian,default", "r=4"])
    plan = plan_experiment(BASE, tiny_config(tiny_model), grid)
    experiment_id = submit_experiment(store, plan, owner=CLI)
    run_local(store, experiment_id)
    last = store.run(int(store.experiment_runs(experiment_id)["id"].iloc[-1]))
    trial = plan.trials[-1]
    fresh_store = Store.open(tmp_path / "fresh")
    fresh_id = fresh_store.create_run("fresh", trial.config.model, trial.config.dataset, {}, {}, owner=CLI)
    script = (
        "import json, sys; from lora_core.store import Store; from lora_core.settings import LoraSettings;"
        " from lora_core.training import TrainConfig, run_training;"
        " c, s = json.loads(sys.argv[1]), json.loads(sys.argv[2]);"
        " run_training(Store.open(sys.argv[3]), int(sys.argv[4]), TrainConfig(**c), LoraSettings.from_peft_dict(s))"
    )
    config = json.dumps(dataclasses.asdict(trial.config))
    settings = json.dumps(trial.settings.to_peft_dict())
    out = subprocess.run(
        [sys.executable, "-c", script, config, settings, str(fresh_store.data_dir), str(fresh_id)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = fresh_store.run(fresh_id)
    assert last["status"] == fresh["status"] == "completed"
    assert last["initial_eval_loss"] == fresh["initial_eval_loss"]
    in_experiment, in_fresh = store.metrics([last["id"]]), fresh_store.metrics([fresh_id])
    assert in_experiment["loss"].tolist() == in_fresh["loss"].tolist()  # every step and evaluation


def test_a_nan_trial_fails_alone_and_leaves_no_trace(tiny_model, tmp_path, monkeypatch) -> None:
    import torch

    from lora_core.training import run as training_run

    original = training_run._train_adapter
    poisoned: list[int] = []

    def poison_second(store, run_id, config, cancel, device, peft_model, *rest):
        if not poisoned:
            poisoned.append(run_id)
        if run_id == poisoned[0] + 1:
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_A" in name:
                        parameter.fill_(float("nan"))
        return original(store, run_id, config, cancel, device, peft_model, *rest)

    monkeypatch.setattr(training_run, "_train_adapter", poison_second)
    store = Store.open(tmp_path)
    plan = plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=2,3,4"]))
    experiment_id = submit_experiment(store, plan, owner=CLI)
    run_local(store, experiment_id)
    table = results(store, experiment_id)
    assert list(table["status"]) == ["completed", "failed", "completed"]
    assert "NaN" in table["error"].iloc[1]
    initial = table["initial_eval_loss"]
    assert initial.iloc[0] == initial.iloc[2]  # the base model, untouched by the poisoned adapter
    assert store.experiment(experiment_id)["status"] == "completed"


def test_cancelling_an_experiment_stops_the_trial_in_flight_and_the_rest(tiny_model, tmp_path) -> None:
    store = Store.open(tmp_path)
    plan = plan_experiment(BASE, tiny_config(tiny_model, steps=2000, eval_every=1000), parse_grid(["r=2,3,4"]))
    experiment_id = submit_experiment(store, plan, owner=CLI)

    def cancel_after_first_steps() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = store.metrics()
            if (metrics["kind"] == "train").sum() >= 2:
                store.cancel_experiment(experiment_id)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_after_first_steps)
    canceller.start()
    outcomes = run_local(store, experiment_id)
    canceller.join()
    assert [o.status for o in outcomes] == ["cancelled"]
    assert list(store.experiment_runs(experiment_id)["status"]) == ["cancelled"] * 3
    assert store.experiment(experiment_id)["status"] == "cancelled"


def test_a_killed_sweep_leaves_its_trials_interrupted(tiny_model, tmp_path) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "lora_core", "sweep", "--model", str(tiny_model), "--dataset", "reverse_list"]
    command += ["--steps", "5000", "--eval-every", "1000", "--batch-size", "2", "--seq-len", "64", "--grid", "r=2,4"]
    process = subprocess.Popen(
        [*command, "--out", str(data)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(
                sqlite3.Error, pd.errors.DatabaseError
            ):  # the file may exist before its tables (pandas wraps the error)
                if (data / "runs.sqlite").exists() and len(Store(data).metrics()) >= 2:
                    break
            time.sleep(0.2)
        assert process.poll() is None, "the sweep ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    store = Store.open(data)
    runs = store.experiment_runs(1)
    assert list(runs["status"]) == ["interrupted", "interrupted"]
    assert "ended without finishing" in runs["error"].iloc[0] and "before the run started" in runs["error"].iloc[1]
    assert store.experiment(1)["status"] == "interrupted"


def test_lora_plus_trains_b_faster_than_a(tiny_model) -> None:
    from peft import get_peft_model

    from lora_core.training import load_model_and_tokenizer
    from lora_core.training.run import _loraplus_optimizer

    model, _ = load_model_and_tokenizer(str(tiny_model), "cpu")
    peft_model = get_peft_model(model, BASE.to_peft_config())
    optimizer = _loraplus_optimizer(peft_model, tiny_config(tiny_model, loraplus_ratio=16.0))
    rates = {group["lr"] for group in optimizer.param_groups if group["params"]}
    assert rates == {1e-2, 16e-2}
    assert _loraplus_optimizer(peft_model, tiny_config(tiny_model)) is None


def test_a_run_reports_to_tensorboard_only_when_asked(tiny_model, tmp_path) -> None:
    store = Store.open(tmp_path)
    for report_to in ((), ("tensorboard",)):
        config = tiny_config(tiny_model, report_to=report_to)
        run_id = store.create_run("tb", config.model, config.dataset, BASE.to_peft_dict(), {}, owner=CLI)
        assert run_training(store, run_id, config, BASE).status == "completed"
    events = sorted((tmp_path / "tensorboard").glob("run-*/events.out.tfevents.*"))
    assert [path.parent.name for path in events] == ["run-2"]
    assert TrainConfig(report_to=("wandb2",)).problems() == [
        "`report_to`: unknown tracker 'wandb2'; use mlflow, tensorboard, wandb"
    ]


# --- the sweep CLI -----------------------------------------------------------------------------


def _sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_core", "sweep", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_sweep_json_ends_with_every_trials_settings_and_outcome(tiny_model, tmp_path) -> None:
    out = _sweep(
        "--model", str(tiny_model), "--dataset", "reverse_list", "--steps", "2", "--eval-every", "1",
        "--batch-size", "2", "--seq-len", "64", "--grid", "r=2,4", "--seeds", "2", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["status"] == "completed" and summary["runner"] == "local"
    trials = summary["trials"]
    assert [(t["values"]["r"], t["values"]["seed"]) for t in trials] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for trial in trials:
        assert trial["status"] == "completed" and trial["settings"]["r"] == trial["values"]["r"]
        assert trial["trainable_params"] > 0 and trial["final_eval_loss"] > 0 and trial["final_train_loss"] > 0
        assert trial["tokens_per_s"] > 0 and trial["memory_estimate_mb"] > 0
    assert summary["best_run_id"] in {t["run_id"] for t in trials}


def test_sweep_on_ray_trains_in_ray_workers_and_reports_like_a_local_one(tiny_model, tmp_path) -> None:
    pytest.importorskip("ray")  # an optional extra for users; `make test` installs it
    out = _sweep(
        "--model", str(tiny_model), "--dataset", "reverse_list", "--steps", "2", "--eval-every", "1",
        "--batch-size", "2", "--seq-len", "64", "--grid", "r=2,4", "--ray", "auto", "--out", str(tmp_path), "--json",
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip())  # stdout holds the JSON object alone: Ray prints nothing there
    assert summary["runner"] == "ray" and summary["status"] == "completed"
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    assert all(t["trained_by"].startswith("ray worker pid") for t in summary["trials"])
    assert all(t["final_eval_loss"] > 0 and t["tokens_per_s"] > 0 for t in summary["trials"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "r=0"], "a rank from 1"),
        (["--grid", "targets=re:(("], "invalid regex"),
        (
            [
                "--grid",
                "r=1,2,3",
                "--grid",
                "dropout=0,0.1,0.2,0.3",
                "--seeds",
                "10",
                "--grid",
                "lr=1e-3,2e-3,3e-3,4e-3,5e-3",
            ],
            "more than 512",
        ),
        (["--grid", "nonsense"], "NAME=V1,V2"),
        ([], "give --grid"),
        (["--space", "huge"], "invalid choice"),
        (["--grid", "r=4", "--seeds", "99"], "seeds must be"),
        (["--grid", "r=4", "--dataset", "upload:../../etc/passwd"], "use a .jsonl or .csv file"),
        (["--grid", "r=4", "--ray", "x", "--local"], "contradict"),
        (["--grid", "r=4", "--steps", "2", "--tokens", "9"], "not allowed with"),
        (["--grid", "r=4", "--report-to", "nope"], "invalid choice"),
        (["--grid", "r=4", "--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["--grid", "r=4", "--ray", "../../x"], "give host:port"),
        (["--grid", "r=4", "--asha"], "add --ray"),
        (["--grid", "r=4", "--ray-storage", "/tmp"], "only applies on Ray"),
        (["--grid", "r=4", "--ray", "auto", "--report-to", "tensorboard"], "set TENSORBOARD_LOGGING_DIR"),
        (["--grid", "r=3", "--grid", "init=orthogonal"], "needs an even rank"),
    ],
)
def test_sweep_refuses_bad_input_with_exit_2_and_creates_nothing(tiny_model, tmp_path, args, message) -> None:
    out = _sweep("--model", str(tiny_model), "--out", str(tmp_path), *args, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    if (tmp_path / "runs.sqlite").exists():
        assert Store.open(tmp_path).experiments().empty and Store.open(tmp_path).runs().empty


def test_the_apps_worker_trains_an_experiments_trials_in_order(tiny_model, tmp_path) -> None:
    from lora_core.runner import RunManager

    manager = RunManager(Store.open(tmp_path))
    try:
        plan = plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["r=2,4", "init=default,pissa"]))
        experiment_id = submit_experiment(manager.store, plan)  # queued for the worker
        runs = [manager.wait(int(run_id), 300) for run_id in manager.store.experiment_runs(experiment_id)["id"]]
    finally:
        manager.shutdown()
    assert [run["status"] for run in runs] == ["completed"] * 4
    assert [run["started"] for run in runs] == sorted(run["started"] for run in runs)
    assert len({run["initial_eval_loss"] for run in runs}) == 1  # each trial starts from the same base model
    assert manager.store.experiment(experiment_id)["status"] == "completed"


def test_trials_that_train_base_tensors_or_fail_to_wrap_get_a_freshly_loaded_model(tiny_model, tmp_path) -> None:
    """unload() keeps a trained bias or modules_to_save copy, and a get_peft_model that fails
    halfway keeps the layers it wrapped: the next trial must not start from either."""
    store = Store.open(tmp_path)
    models = BaseModels()
    biased = plan_experiment(BASE.replace(bias="all"), tiny_config(tiny_model), parse_grid(["r=2,4"]))
    run_local(store, submit_experiment(store, biased, owner=CLI), base_models=models)
    assert models.loads == 2  # the second trial did not get the first one's trained biases
    # MiCA needs r <= every targeted layer's smaller side (32 here): q_proj is wrapped, then PEFT raises
    wrapping = plan_experiment(BASE, tiny_config(tiny_model), parse_grid(["init=mica,default", "r=40"]))
    outcomes = run_local(store, submit_experiment(store, wrapping, owner=CLI), base_models=models)
    assert [o.status for o in outcomes] == ["failed", "completed"] and models.loads == 4


@pytest.mark.parametrize(
    ("statuses", "flag", "expected"),
    [
        (["completed", "completed"], True, "completed"),  # Cancel pressed as the last trial ended
        (["cancelled", "cancelled"], False, "cancelled"),  # each trial cancelled on the Fine-tune page
        (["completed", "failed"], False, "completed"),
        (["completed", "cancelled"], False, "completed"),  # one trial stopped early by ASHA, or alone
        (["completed", "cancelled"], True, "cancelled"),
        (["failed", "failed"], False, "failed"),
        (["completed", "interrupted"], True, "interrupted"),
        (["completed", "queued"], True, "cancelling"),
        (["running", "queued"], False, "running"),
    ],
)
def test_an_experiments_status_follows_its_trials(tmp_path, statuses, flag, expected) -> None:
    store = Store.open(tmp_path)
    trial = {"name": "t", "model": "m", "dataset": "d", "settings": {}, "config": {}, "owner": CLI}
    experiment_id = store.create_experiment("e", "m", "d", {}, trials=[trial] * len(statuses))
    for run_id, status in zip(store.experiment_runs(experiment_id)["id"], statuses, strict=True):
        store.update_run(int(run_id), status=status, owner_pid=os.getpid())
    if flag:
        store._write("UPDATE experiments SET cancel_requested = 1 WHERE id = ?", (experiment_id,))
    assert store.experiment(experiment_id)["status"] == expected


def test_ctrl_c_on_a_local_sweep_cancels_its_trials_and_exits_130(tiny_model, tmp_path) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "lora_core", "sweep", "--model", str(tiny_model), "--dataset", "reverse_list"]
    command += ["--steps", "5000", "--eval-every", "1000", "--batch-size", "2", "--seq-len", "64", "--grid", "r=2,4"]
    process = subprocess.Popen(
        [*command, "--out", str(data)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(sqlite3.Error, pd.errors.DatabaseError):
            if (data / "runs.sqlite").exists() and len(Store(data).metrics()) >= 2:
                break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted")
    runs = Store.open(data).experiment_runs(1)
    assert list(runs["status"]) == ["cancelled", "cancelled"]
    assert runs["adapter_dir"].iloc[0] and Path(runs["adapter_dir"].iloc[0]).is_dir()  # the stopped trial kept its work


def test_ctrl_c_during_one_of_the_main_threads_own_writes_still_cancels(tmp_path) -> None:
    """The CI failure of 2026-12-01: Ctrl-C landed while the main thread held a store write; the
    handler's own write then waited on that lock and failed with "database is locked"."""
    store = Store.open(tmp_path)
    trial = {"name": "t", "model": "m", "dataset": "d", "settings": {}, "config": {}, "owner": CLI}
    experiment_id = store.create_experiment("e", "m", "d", {}, trials=[trial, trial])
    with pytest.raises(KeyboardInterrupt), engine.ctrl_c_cancels(store, experiment_id):
        db = sqlite3.connect(store.path, timeout=30)
        db.execute("BEGIN IMMEDIATE")  # the main thread's write, in flight
        db.execute("UPDATE runs SET name = 'renamed' WHERE id = 1")
        signal.raise_signal(signal.SIGINT)
        db.commit()
        db.close()
    assert store.experiment_cancel_requested(experiment_id)
    assert store.run(1)["name"] == "renamed"  # the interrupted write was kept


def test_a_cancel_that_cannot_be_written_is_one_line_and_ctrl_c_still_stops(tmp_path, capsys, monkeypatch) -> None:
    store = Store.open(tmp_path)
    trial = {"name": "t", "model": "m", "dataset": "d", "settings": {}, "config": {}, "owner": CLI}
    experiment_id = store.create_experiment("e", "m", "d", {}, trials=[trial])

    def locked(_experiment_id):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "cancel_experiment", lambda self, experiment_id: locked(experiment_id))
    with pytest.raises(KeyboardInterrupt), engine.ctrl_c_cancels(store, experiment_id):
        signal.raise_signal(signal.SIGINT)
    err = capsys.readouterr().err
    assert err == f"experiment {experiment_id} could not be marked cancelled: database is locked\n"
