"""AppTest of the Advisor page: the advice follows the form and the sidebar's model, shows the
engine's count, each choice's claims, Apply sets the sidebar, bad input keeps the page, and Verify
queues an experiment around the advice that the page then reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_core.advisor import Case, advise, show
from lora_core.advisor.verify import verify_grid
from lora_core.runner import RunManager
from lora_core.store import Store
from pages.common import resources

APP = str(Path(__file__).resolve().parents[1] / "app.py")


class QueueOnly(RunManager):
    """Queues runs and starts no worker: the Verify tests read and write the trials themselves."""

    def __init__(self, store) -> None:
        self.store = store


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(resources, "RunManager", QueueOnly)
    return tmp_path / "data"


@pytest.fixture
def page(data_dir) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("pages/advisor.py").run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def model_of(at: AppTest) -> str:
    return at.session_state["lx_spec"].model_id


def test_the_advice_is_the_engines_for_the_sidebar_model_and_the_form(page: AppTest) -> None:
    expected = advise(Case(model_of(page), "sft", 2000, 256.0, 0.0, 24.0, "quality"))
    assert metrics(page)["Trainable parameters (exact)"] == f"{expected.count.trainable_params:,}"
    assert metrics(page)["On your 24 GiB GPU"] == ("fits" if expected.fits else "does not fit")
    page.number_input(key="lx_adv_examples").set_value(200_000).run()
    bigger = advise(Case(model_of(page), "sft", 200_000, 256.0, 0.0, 24.0, "quality"))
    assert bigger.settings.r > expected.settings.r
    assert metrics(page)["Trainable parameters (exact)"] == f"{bigger.count.trainable_params:,}"
    table = page.dataframe[0].value
    assert table.set_index("field").loc["r", "value"] == str(bigger.settings.r)


def test_every_choice_shows_its_claims_with_sources(page: AppTest) -> None:
    text = " ".join(m.value for m in page.markdown)
    for claim in ("tm-lr-table", "tm-capacity", "peft-lora-mlp-r10", "no-dropout-benchmarks", "app-epochs"):
        assert f"`{claim}`" in text
    assert "github.com/thinking-machines-lab/tinker-cookbook/blob/" in text
    assert len(page.expander) == len(advise(Case(model_of(page), examples=2000)).choices)


def test_apply_puts_the_advice_in_the_sidebar(page: AppTest) -> None:
    page.number_input(key="lx_adv_examples").set_value(100_000).run()
    advice = advise(Case(model_of(page), "sft", 100_000, 256.0, 0.0, 24.0, "quality"))
    page.button(key="lx_adv_apply").click().run()
    assert not page.exception, page.exception
    assert page.slider(key="lx_r").value == advice.settings.r
    assert page.number_input(key="lx_alpha").value == advice.settings.lora_alpha
    assert page.selectbox(key="lx_strategy").value == "All linear"
    assert page.slider(key="lx_dropout").value == advice.settings.lora_dropout


def test_export_gives_the_peft_config_and_the_advice(page: AppTest) -> None:
    buttons = {b.proto.label: b for b in page.get("download_button")}
    assert "Export adapter_config.json" in buttons and "Export the advice (JSON)" in buttons


def test_a_measured_upload_drives_the_advice_and_a_bad_one_says_why(page: AppTest) -> None:
    page.radio(key="lx_adv_source").set_value("Measure an upload").run()
    rows = [{"prompt": f"question {i}", "completion": "answer " * 40} for i in range(30)]
    good = "\n".join(json.dumps(row) for row in rows).encode()
    page.file_uploader(key="lx_adv_upload").set_value(("data.jsonl", good, "application/octet-stream")).run()
    assert not page.exception, page.exception
    caption = next(c.value for c in page.caption if c.value.startswith("Measured"))
    assert "30 examples" in caption
    advised = metrics(page)["Trainable parameters (exact)"]
    for name, payload, words in [
        ("junk.jsonl", bytes(range(256)) * 8, "UTF-8"),
        ("../../etc/passwd", b"root:x:0:0", "use a .jsonl, .json or .csv file"),
        ("empty.csv", b"", "empty"),
    ]:
        page.file_uploader(key="lx_adv_upload").set_value((name, payload, "application/octet-stream")).run()
        assert not page.exception, page.exception
        errors = [e.value for e in page.error]
        assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0], errors
    page.file_uploader(key="lx_adv_upload").set_value(("data.jsonl", good, "application/octet-stream")).run()
    assert metrics(page)["Trainable parameters (exact)"] == advised  # nothing the user had was lost


def test_a_built_in_task_is_measured_and_a_huge_gpu_fits(page: AppTest) -> None:
    page.radio(key="lx_adv_source").set_value("Measure a built-in task").run()
    assert not page.exception, page.exception
    caption = next(c.value for c in page.caption if c.value.startswith("Measured"))
    assert "examples" in caption and "tokens" in caption
    page.number_input(key="lx_adv_gpu").set_value(4096.0).run()
    assert not page.exception and metrics(page)["On your 4096 GiB GPU"] == "fits"


def test_verify_queues_the_advice_and_its_neighbours(page: AppTest, data_dir: Path) -> None:
    advice = advise(Case(model_of(page), examples=2000))
    page.number_input(key="lx_adv_steps").set_value(2)
    page.button(key="lx_adv_verify").click().run()
    assert not page.exception, page.exception
    assert any("queued" in s.value for s in page.success), [e.value for e in page.error]
    store = Store.open(data_dir)
    experiment = store.experiments().iloc[0]
    runs = store.experiment_runs(int(experiment["id"]))
    ranks, rates = verify_grid(advice)
    assert len(runs) == len(ranks.split(",")) * len(rates.split(","))
    trials = [json.loads(t) if isinstance(t, str) else t for t in runs["trial"]]
    assert {t["values"]["r"] for t in trials} == {int(v) for v in ranks.removeprefix("r=").split(",")}
    assert any(
        t["values"]["r"] == advice.settings.r and t["values"]["lr"] == advice.training.learning_rate for t in trials
    )


def test_the_form_keeps_its_values_across_the_dataset_switch_and_other_pages(page: AppTest) -> None:
    page.number_input(key="lx_adv_examples").set_value(12345).run()
    page.number_input(key="lx_adv_completion").set_value(77.0).run()
    page.number_input(key="lx_adv_gpu").set_value(80.0).run()
    page.radio(key="lx_adv_priority").set_value("speed").run()
    page.radio(key="lx_adv_source").set_value("Measure a built-in task").run()
    page.radio(key="lx_adv_source").set_value("Numbers").run()
    page.switch_page("pages/overview.py").run()
    page.switch_page("pages/advisor.py").run()
    assert not page.exception, page.exception
    assert page.number_input(key="lx_adv_examples").value == 12345
    assert page.number_input(key="lx_adv_completion").value == 77.0
    assert page.number_input(key="lx_adv_gpu").value == 80.0
    assert page.radio(key="lx_adv_priority").value == "speed"
    expected = advise(Case(model_of(page), "sft", 12345, 77.0, 0.0, 80.0, "speed"))
    assert metrics(page)["Trainable parameters (exact)"] == f"{expected.count.trainable_params:,}"


def test_verify_twice_queues_once_and_failed_trials_say_why(page: AppTest, data_dir: Path) -> None:
    page.number_input(key="lx_adv_steps").set_value(2)
    page.button(key="lx_adv_verify").click().run()
    page.button(key="lx_adv_verify").click().run()
    assert not page.exception, page.exception
    assert any("already being verified as experiment 1" in w.value for w in page.warning)
    store = Store.open(data_dir)
    assert len(store.experiments()) == 1
    for run_id in store.experiment_runs(1)["id"]:
        store.update_run(int(run_id), status="failed", error="model could not be loaded (no weights)")
    page.run()
    assert any("Its trials failed: model could not be loaded" in e.value for e in page.error)


def test_verify_trains_on_the_users_upload_at_the_chosen_length(page: AppTest, data_dir: Path) -> None:
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]
    data = "\n".join(json.dumps(row) for row in rows).encode()
    page.radio(key="lx_advv_data_source").set_value("Upload JSONL/CSV")
    page.file_uploader(key="lx_advv_upload").set_value(("mine.jsonl", data, "application/octet-stream"))
    page.select_slider(key="lx_adv_seq").set_value(64)
    page.number_input(key="lx_adv_steps").set_value(2)
    page.button(key="lx_adv_verify").click().run()
    assert not page.exception, page.exception
    assert any("queued" in s.value for s in page.success), [e.value for e in page.error]
    store = Store.open(data_dir)
    runs = store.experiment_runs(int(store.experiments().iloc[0]["id"]))
    configs = [json.loads(c) if isinstance(c, str) else c for c in runs["config"]]
    assert {c["seq_len"] for c in configs} == {64}
    assert all(c["dataset"].startswith(f"upload:{data_dir / 'uploads'}/") for c in configs)


# --- a finished Verify: its trials completed in the store as training writes them ---------------


def finish(store: Store, run_id: int, eval_loss: float) -> None:
    """Complete a queued run as `run_training` does: running, an eval point, then the final losses."""
    store.update_run(run_id, status="running", started=1000.0 + run_id, device="cpu")
    store.add_metric(run_id, "eval", 2, loss=eval_loss, tokens=1024, elapsed=1.0)
    store.update_run(
        run_id, status="completed", final_train_loss=eval_loss + 0.1, final_eval_loss=eval_loss,
        peak_memory_mb=500.0, finished=1005.0 + run_id,
    )  # fmt: skip


def repeat(store: Store, run: dict, eval_loss: float) -> None:
    """A second seed of a trial (as Verify with repeats would queue), completed at `eval_loss`."""
    config = {**run["config"], "seed": 1}
    trial = {**run["trial"], "values": {**run["trial"]["values"], "seed": 1}}
    run_id = store.create_run(
        run["name"] + " seed=1", run["model"], run["dataset"], run["settings"], config,
        experiment_id=run["experiment_id"], trial=trial,
    )  # fmt: skip
    finish(store, run_id, eval_loss)


def verdict_and_ranking(at: AppTest) -> tuple[str, list[tuple[int, float, str]]]:
    """The verdict line under the experiment's status, and the ranking as (r, lr, verdict) rows."""
    at.run()
    assert not at.exception, at.exception
    texts = [m.value for m in at.markdown]
    status = texts.index("Experiment 1: **completed**")
    table = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    return texts[status + 1], list(zip(table["r"], table["lr"], table["verdict"], strict=True))


def test_a_finished_verify_shows_the_verdict_on_the_advice_and_the_ranking(page: AppTest, data_dir: Path) -> None:
    advice = advise(Case(model_of(page), examples=2000))
    r, lr = advice.settings.r, advice.training.learning_rate
    page.number_input(key="lx_adv_steps").set_value(2)
    page.button(key="lx_adv_verify").click().run()
    store = Store.open(data_dir)
    runs = [store.run(int(run_id)) for run_id in store.experiment_runs(1)["id"]]
    values = [run["trial"]["values"] for run in runs]
    ranks = sorted({v["r"] for v in values})
    advised = min(range(len(runs)), key=lambda i: (values[i]["r"] != r, abs(values[i]["lr"] - lr)))
    bigger = ranks[ranks.index(r) + 1]
    neighbour = next(i for i, v in enumerate(values) if v["r"] == bigger and v["lr"] == values[advised]["lr"])
    # the advice 1.0; the rest further off the more they differ from it
    for i, run in enumerate(runs):
        gap = abs(ranks.index(values[i]["r"]) - ranks.index(r)) + abs(values[i]["lr"] - lr) / lr
        finish(store, run["id"], 1.0 + 0.1 * gap)
    verdict, ranking = verdict_and_ranking(page)
    assert verdict == f"The advised config (r={r}) has the lowest eval loss of the {len(runs)} configs tried."
    assert ranking[0] == (r, values[advised]["lr"], "best") and len(ranking) == len(runs)
    assert {row[2] for row in ranking[1:]} == {"no seed spread"}

    store.update_run(runs[neighbour]["id"], final_eval_loss=0.8)  # one seed: could be noise
    where = f"r={bigger}, lr={show(values[neighbour]['lr'])}"
    verdict, ranking = verdict_and_ranking(page)
    assert verdict == (
        f"{where} beat the advised config by 0.2000 eval loss, with one seed each: repeat with seeds to tell it "
        "from noise."
    )
    assert ranking[:2] == [(bigger, values[neighbour]["lr"], "best"), (r, values[advised]["lr"], "no seed spread")]

    # second seeds: the neighbour 0.80 and 0.82 (mean 0.81), the advice 1.00 and 1.01 (1.005), a gap
    # of 0.195, more than either spread (0.02, 0.01)
    repeat(store, runs[neighbour], 0.82)
    repeat(store, runs[advised], 1.01)
    verdict, ranking = verdict_and_ranking(page)
    assert (
        verdict == f"{where} beat the advised config by 0.1950 eval loss, more than the seeds' spread: prefer it here."
    )
    assert ranking[:2] == [(bigger, values[neighbour]["lr"], "best"), (r, values[advised]["lr"], "worse")]

    # the neighbour's second seed at 1.10 instead: mean 0.95, spread 0.30, wider than the gap of 0.055
    seed_1 = store.experiment_runs(1).iloc[-2]
    assert json.loads(seed_1["trial"])["values"] == {**values[neighbour], "seed": 1}
    store.update_run(int(seed_1["id"]), final_eval_loss=1.10)
    verdict, ranking = verdict_and_ranking(page)
    assert verdict == f"The advised config is within seed noise of the best ({where}): 0.0550 higher eval loss."
    assert ranking[:2] == [(bigger, values[neighbour]["lr"], "best"), (r, values[advised]["lr"], "not significant")]
