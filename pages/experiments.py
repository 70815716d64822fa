"""Experiments: a grid of LoRA configs trained on the same data, budget and seeds, then compared by
what they learn against what they cost. Each trial is an ordinary run (the Fine-tune page lists it
too), trained by the server's worker one after another on one loaded base model, or on Ray."""

from __future__ import annotations

import dataclasses
import json
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import lora_core
from lora_core import LoraSettings
from lora_core.errors import InputError
from lora_core.experiments import (
    DIMENSIONS,
    INITS,
    MAX_SEEDS,
    estimate_plan,
    experiment_progress,
    parse_value,
    plan_experiment,
    ranked,
    results,
    submit_experiment,
    trial_of,
    varied_dimensions,
)
from lora_core.models import local_model_roots
from lora_core.store import ACTIVE, WORKER
from lora_core.strategies import SEARCH_SPACES, STRATEGIES
from lora_core.training.config import TrainConfig
from lora_core.training.trackers import TRACKERS
from pages.common import (
    MODEL_SOURCES,
    chosen_dataset,
    config_name,
    dataset_fields,
    follow_metrics,
    page_state,
    request_apply,
    run_manager,
    run_name,
    sidebar_changes,
    store_upload,
    training_model,
    training_settings,
)
from pages.common.experiment_charts import COSTS, Curve, loss_curves, parallel_figure, pareto_figure

# Seconds between polls while a trial is active, as on the Fine-tune page: each poll costs the
# watching browser a redraw, CPU that a trial training on the same machine would use.
POLL_SECONDS = 2.0
# A poll follows the points of at most this many trials (the active ones first), and small
# multiples draw at most MAX_PANELS panels, however large the grid.
MAX_CURVES, MAX_PANELS = 48, 24
# The learning rate of every trial when the grid gives none (the Fine-tune page's default).
BASE_LR = 1e-3
NO_SPACE, SIDEBAR = "none", "as in the sidebar"
SPACE_SETS = ("targets", "r", "alpha", "dropout")  # what a search space chooses
FLAG_CHOICES = {SIDEBAR: None, "off": (False,), "on": (True,), "both": (False, True)}
LOCAL, RAY = "This server's worker", "A Ray cluster"
# The ranking's columns after its rank, label and grid values.
RANKED_COLUMNS = ("eval_loss", "seed_spread", "seeds", "seeds_lost", "verdict", "trainable_params", "peak_memory_mb")
RANKED_COLUMNS += ("train_seconds", "run_id")

state = page_state()
manager = run_manager()
store = manager.store
st.title("Experiments")
st.write(
    "Train a grid of LoRA configs on the same data, budget and seeds, then compare what each learns against "
    "its size, memory and time. Every trial is an ordinary run (the Fine-tune page lists it too); experiments "
    "stay across reloads, tabs and restarts."
)
requested = st.session_state.pop("lx_exp_space_request", None)
if requested in SEARCH_SPACES:  # "Run these" on the Search spaces page
    st.session_state["lx_exp_space"] = requested
    st.info(f"The {requested} search space is selected: pick the model, dataset and budget, then Plan or Start.")
notice = st.session_state.pop("lx_exp_notice", None)
if notice:
    st.success(notice)


def form_grid(fields: dict[str, list[str]], flags: dict[str, str], space: str | None) -> dict:
    """The grid the form's fields describe: one dimension per field with values (an empty field,
    or "as in the sidebar", keeps the sidebar's value). A search space chooses targets, r, alpha
    and dropout itself. Raises `GridError` naming the value that cannot be used."""
    grid = {}
    for name, values in fields.items():
        if values and not (space and name in SPACE_SETS):
            grid[name] = tuple(dict.fromkeys(parse_value(name, str(value).strip()) for value in values))
    for name, choice in flags.items():
        if FLAG_CHOICES[choice] is not None:
            grid[name] = FLAG_CHOICES[choice]
    return grid


with st.form("lx_exp_form"):
    col1, col2 = st.columns(2)
    model_source = col1.radio("Model", MODEL_SOURCES, key="lx_exp_model_source")
    model_text = col1.text_input("Hub id or local folder (causal LM)", key="lx_exp_model_text")
    space_choice = col1.radio(
        "Search space", [NO_SPACE, *SEARCH_SPACES], horizontal=True, key="lx_exp_space",
        help="one of the article's grids (the Search spaces page): it sets targets, r, alpha and dropout; "
        "the other fields below still apply",
    )  # fmt: skip
    data_source, task, upload, hub_text = dataset_fields("lx_exp", col2)
    st.caption("The grid: every combination of the values below. An empty field keeps the sidebar's value.")
    col1, col2, col3, col4 = st.columns(4)
    fields = {
        "targets": col1.multiselect(
            "Target strategies", list(STRATEGIES), default=["Q,V", "All linear"], key="lx_exp_targets",
            accept_new_options=True, help="or type modules joined by + (q_proj+v_proj), or re:REGEX",
        ),
        "r": col2.multiselect(
            "Ranks r", ["1", "2", "4", "8", "16", "32", "64", "128"], default=["4", "16"], key="lx_exp_ranks",
            accept_new_options=True,
        ),
        "alpha": col3.multiselect(
            "Alphas", ["r", "2r", "4r", "8", "16", "32"], default=["2r"], key="lx_exp_alphas",
            accept_new_options=True, help="a number, or a multiple of each trial's rank (2r)",
        ),
        "lr": col4.multiselect(
            "Learning rates", ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "2e-3", "5e-3"], default=["1e-3"],
            key="lx_exp_lrs", accept_new_options=True, help=f"empty: {BASE_LR:g}",
        ),
        "dropout": col1.multiselect(
            "Dropouts", ["0", "0.05", "0.1"], key="lx_exp_dropouts", accept_new_options=True
        ),
        "loraplus": col2.multiselect(
            "LoRA+ ratios", ["off", "4", "16"], key="lx_exp_loraplus", accept_new_options=True,
            help="B's learning rate over A's (Hayou et al. use 16); empty: off",
        ),
        "init": col3.multiselect(
            "Initialisation (init_lora_weights)", list(INITS), key="lx_exp_inits", accept_new_options=True,
            help="also pissa_niter_N; empty: PEFT's default",
        ),
    }  # fmt: skip
    flags = {
        "rslora": col4.selectbox("rsLoRA", list(FLAG_CHOICES), key="lx_exp_rslora"),
        "dora": col4.selectbox("DoRA", list(FLAG_CHOICES), key="lx_exp_dora"),
    }
    col1, col2, col3, col4, col5, col6 = st.columns(6)
    budget = col1.radio("Budget per trial", ["steps", "tokens"], key="lx_exp_budget")
    steps = col2.number_input("Steps", 1, 2000, 30, key="lx_exp_steps")
    tokens = col2.number_input("Tokens", 1, 10**9, 15_360, step=512, key="lx_exp_tokens")
    batch_size = col3.select_slider("Batch size", [1, 2, 4, 8, 16], value=4, key="lx_exp_batch")
    seq_len = col4.select_slider("Sequence length", [64, 128, 256, 512, 1024], value=128, key="lx_exp_seq")
    eval_every = col5.number_input("Eval every", 1, 500, 10, key="lx_exp_eval_every")
    seeds = col6.number_input("Repeats (seeds)", 1, MAX_SEEDS, 1, key="lx_exp_seeds")
    col1, col2, col3, col4 = st.columns(4)
    name_text = col1.text_input("Experiment name (optional)", key="lx_exp_name")
    runner = col2.radio("Train on", [LOCAL, RAY], key="lx_exp_runner")
    ray_text = col3.text_input("Ray address", placeholder="auto, or ray://host:10001", key="lx_exp_ray")
    asha = col3.checkbox(
        "ASHA early stopping (on eval loss)", key="lx_exp_asha",
        help="on a Ray cluster: trials whose eval loss falls behind stop early (ASHA: at the first evaluation, "
        "then at twice as many steps each time, half of the trials go on); needs Eval every below Steps",
    )  # fmt: skip
    report_to = col4.multiselect("Report to (trackers)", list(TRACKERS), key="lx_exp_report")
    col1, col2 = st.columns([1, 6])
    planning = col1.form_submit_button("Plan", key="lx_exp_plan")
    starting = col2.form_submit_button("Start", type="primary", key="lx_exp_start")


def form_plan():
    """The checked plan of the form, and the upload it needs stored (or None). Raises `InputError`."""
    model_choice = training_model(model_source, model_text)
    dataset, checked = chosen_dataset(data_source, task, "lx_exp_upload", upload, hub_text)
    name = run_name(name_text, "an experiment name")
    if state.error:
        raise InputError(f"the sidebar settings are invalid: {state.error}")
    space = None if space_choice == NO_SPACE else space_choice
    grid = form_grid(fields, flags, space)
    settings, note = training_settings(state, model_choice)
    if note.startswith("could not map") and "targets" not in grid and not space:
        raise InputError(f"{note}; pick target strategies for the grid")
    config = TrainConfig(
        model=model_choice, dataset=dataset, steps=int(steps), learning_rate=BASE_LR, batch_size=int(batch_size),
        seq_len=int(seq_len), eval_every=int(eval_every), report_to=tuple(report_to),
    )  # fmt: skip
    plan = plan_experiment(settings, config, grid, space, int(seeds), int(tokens) if budget == "tokens" else None, name)
    return plan, checked


def ray_address(plan) -> str | None:
    """Where the trials run: the Ray address (None: this server's worker), once Ray is installed, the
    cluster answers and ASHA has evaluations to compare trials at, as the CLI checks before anything
    is written. Raises `InputError`."""
    if runner != RAY:
        if asha:
            raise InputError("ASHA early stopping runs on a Ray cluster: train on A Ray cluster, or clear ASHA")
        return None
    from lora_core.experiments.ray_tune import check_ray

    address = ray_text.strip() or "auto"
    trial = plan.trials[0].config
    check_ray(address, asha, trial.steps, trial.eval_every, trial.report_to)
    return address


def show_estimate(estimate: dict) -> None:
    col1, col2, col3 = st.columns(3)
    col1.metric("Trials", f"{estimate['trials']:,}")
    peak = estimate["largest_peak_mb"]
    col2.metric("Largest trial's peak memory (estimated)", f"{peak:,.0f} MiB" if peak is not None else "unknown")
    seconds = estimate["seconds"]
    col3.metric("Wall time (estimated)", duration(seconds) if seconds is not None else "unknown")
    largest = f"Largest: {estimate['largest']}. " if estimate["largest"] else ""
    st.caption(f"{largest}Time: {estimate['basis']}.")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:,.0f} s"
    return f"{seconds / 60:,.0f} min" if seconds < 5400 else f"{seconds / 3600:,.1f} h"


if planning or starting:
    try:
        plan, checked = form_plan()
        estimate = estimate_plan(store, plan)
        if starting:
            address = ray_address(plan)
            if checked is not None:  # stored only once the plan and the runner hold; trials name the stored file
                path = store_upload(checked, store.data_dir)
                config = dataclasses.replace(plan.base_config, dataset=f"upload:{path}")
                plan = plan_experiment(
                    plan.base_settings, config, plan.grid, plan.space, plan.seeds, plan.budget.get("tokens"), plan.name
                )
            experiment_id = submit_experiment(
                store, plan, runner="ray" if address else "local", owner=WORKER, ray_address=address, asha=asha
            )
    except InputError as error:
        st.error(f"{'Not started' if starting else 'Cannot plan'}: {error}")
    else:
        st.session_state["lx_exp_estimate"] = estimate
        if starting:
            st.session_state["lx_exp_pick"] = experiment_id
            early = " with ASHA early stopping" if asha else ""
            st.success(f"Experiment {experiment_id} queued: {len(plan.trials)} trials of {plan.name}{early}.")
if st.session_state.get("lx_exp_estimate"):
    show_estimate(st.session_state["lx_exp_estimate"])


def last(points: pd.DataFrame | None, kind: str, column: str):
    if points is None:
        return None
    rows = points[points["kind"] == kind]
    return rows[column].iloc[-1] if len(rows) else None


def progress_panel(runs: pd.DataFrame, metrics: dict[int, pd.DataFrame]) -> None:
    """The whole experiment's progress: trials finished, steps done (finished trials count whole,
    the training one to its last point) and the time left at the pace so far."""
    finished = runs["finished"].dropna()
    ended = None if runs["status"].isin(ACTIVE).any() or finished.empty else float(finished.max())
    progress = experiment_progress(runs, now=ended)  # a finished experiment's clock stops at its end
    done = 0
    for run in runs.to_dict("records"):
        if run["status"] in ACTIVE:
            done += int(last(metrics.get(run["id"]), "train", "step") or 0)
        else:
            done += int(json.loads(run["config"])["steps"])
    total = max(progress["steps_total"], 1)
    elapsed = progress["elapsed"]
    text = f"{progress['finished']}/{progress['trials']} trials done · step {done:,}/{total:,}"
    training = runs[runs["status"] == "running"]
    if len(training):
        text += f" · training trial {int(trial_of(training.iloc[0].to_dict()).get('index', 0)) + 1}"
    if done and elapsed:
        text += f" · {duration(elapsed)} elapsed"
        if ended is None:
            text += f" · ~{duration(elapsed * (total - done) / done)} left"
    st.progress(min(done / total, 1.0), text=text)


def live_table(runs: pd.DataFrame, metrics: dict[int, pd.DataFrame]) -> None:
    """One row per trial, filled in as points arrive."""
    rows = []
    for run in runs.to_dict("records"):
        points = metrics.get(run["id"])
        rows.append(
            {
                "trial": int(trial_of(run).get("index", len(rows))) + 1,
                "label": str(run["name"]).split(": ", 1)[-1],
                "status": run["status"],
                "step": last(points, "train", "step"),
                "train loss": last(points, "train", "loss"),
                "eval loss": run["final_eval_loss"]
                if pd.notna(run["final_eval_loss"])
                else last(points, "eval", "loss"),
                "trainable params": run["trainable_params"],
                "peak MiB": run["peak_memory_mb"],
                "run": run["id"],
            }
        )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        key="lx_exp_live_table",
        column_config={
            "peak MiB": st.column_config.NumberColumn(format="%.0f"),
            "trainable params": st.column_config.NumberColumn(format="localized"),
        },
    )


def curves_figure(runs: pd.DataFrame, metrics: dict[int, pd.DataFrame], seqs: dict[int, int]) -> go.Figure:
    """The followed trials' loss curves as chosen (colour, overlaid or small multiples). Built
    again only when a point or a choice changed: a poll with nothing new sends the same figure,
    which the browser keeps as drawn."""
    colour_by = st.session_state.get("lx_exp_colour", "trial")
    overlaid = st.session_state.get("lx_exp_layout", "overlaid") == "overlaid"
    shown = runs[runs["id"].isin(metrics.keys())].sort_values("id")
    shown = shown if overlaid else shown.head(MAX_PANELS)
    key = (colour_by, overlaid, tuple((run_id, seqs.get(run_id, 0)) for run_id in shown["id"]))
    cached = st.session_state.get("lx_exp_live_figure")
    if cached is not None and cached[0] == key:
        return cached[1]
    curves = []
    for run in shown.to_dict("records"):
        trial = trial_of(run)
        label = str(run["name"]).split(": ", 1)[-1]
        curves.append(Curve(int(trial.get("index", 0)) + 1, trial.get("values", {}), label, metrics[run["id"]]))
    figure = loss_curves(curves, colour_by, overlaid)
    st.session_state["lx_exp_live_figure"] = (key, figure)
    return figure


def live(experiment_id: int, polling: bool) -> None:
    """What the fragment redraws each poll: the progress, the table and the curves. A poll reads
    this experiment's trials and only their points written since the last poll."""
    runs = store.experiment_runs(experiment_id)
    active = runs[runs["status"].isin(ACTIVE)]
    if polling and active.empty:
        st.rerun()  # the last trial ended: the full page shows the results, and the polling stops
    started = runs[runs["status"] != "queued"]
    running = runs.loc[runs["status"] == "running", "id"].tolist()
    follow = list(dict.fromkeys([*running, *started["id"].tolist()]))[:MAX_CURVES]
    held = follow_metrics(store, follow, "lx_exp_live_metrics")
    metrics = {run_id: frame for run_id, (_, frame) in held.items() if frame is not None}
    progress_panel(runs, metrics)
    if metrics:
        seqs = {run_id: seq for run_id, (seq, _) in held.items()}
        st.plotly_chart(curves_figure(runs, metrics, seqs), key="lx_exp_curves")
        if len(started) > len(follow):
            st.caption(f"The curves of {len(follow)} of the {len(started)} trials that started are drawn.")
    else:
        st.caption("The curves appear with the first trial's first steps.")
    live_table(runs, metrics)


def experiment_results(experiment: dict) -> pd.DataFrame:
    """`results` of a finished experiment, read once per session: its trials no longer change."""
    key = (int(experiment["id"]), experiment["finished"], int(experiment["trials"]))
    cached = st.session_state.get("lx_exp_results")
    if cached is None or cached[0] != key:
        cached = (key, results(store, int(experiment["id"])))
        st.session_state["lx_exp_results"] = cached
    return cached[1]


def apply_trial(run: dict, experiment: dict, page: str | None = None) -> None:
    """Put a trial's settings in the sidebar, on the model it trained (its config: the embedded
    model is SmolLM2-135M's), and rerun (on `page` when given)."""
    settings = LoraSettings.from_peft_dict(run["settings"])
    name = config_name(experiment["model"])
    try:
        spec = lora_core.resolve_model(name, local_roots=local_model_roots())
        changes, left_out = sidebar_changes(settings, lora_core.inventory(spec))
    except InputError as error:
        st.error(f"Not applied, the current settings are kept: {error}")
        return
    if spec.source == "catalogue":
        changes.update(lx_source="Catalogue", lx_catalogue_choice=spec.model_id)
    else:
        changes.update(lx_source="Hub id or path", lx_model_text=name)
    st.session_state["lx_spec"] = spec
    config = run["config"]
    training = f"learning rate {config['learning_rate']:g}"
    if config.get("loraplus_ratio"):
        training += f", LoRA+ ratio {config['loraplus_ratio']:g}"
    message = f"Trial {int(trial_of(run).get('index', 0)) + 1}'s settings are in the sidebar, on {spec.model_id}"
    message += f"; it trained with {training} (training settings the sidebar does not hold)"
    if left_out:
        message += f"; the sidebar has no place for {', '.join(left_out)}"
    st.session_state["lx_exp_notice"] = message + "."
    request_apply(changes, page)


def results_section(experiment: dict, colour_by: str) -> None:
    """When no trial is active: Pareto charts, parallel coordinates, the ranking and the best."""
    frame = experiment_results(experiment)
    done = frame[(frame["status"] == "completed") & frame["final_eval_loss"].notna()]
    if done.empty:
        st.info("No trial completed with an eval loss, so there is nothing to compare.")
        return
    st.subheader("Loss against cost")
    tabs = st.tabs([f"vs {label}" for label in COSTS.values()])
    for tab, cost in zip(tabs, COSTS, strict=True):
        with tab:
            if done[cost].notna().any():
                st.plotly_chart(pareto_figure(done, cost, colour_by), key=f"lx_exp_pareto_{cost}")
            else:
                st.caption(f"No trial measured its {COSTS[cost]}.")
    dimensions = [name for name in varied_dimensions(frame) if name != "seed"]
    if dimensions:
        st.subheader("Parallel coordinates")
        st.plotly_chart(parallel_figure(done, dimensions), key="lx_exp_parallel")
    st.subheader("Ranking")
    table = ranked(frame)
    st.dataframe(
        table[["rank", "label", *[name for name in DIMENSIONS if name in table.columns], *RANKED_COLUMNS]],
        hide_index=True,
        key="lx_exp_ranked",
        column_config={
            "eval_loss": st.column_config.NumberColumn("eval loss (mean over seeds)", format="%.4f"),
            "seed_spread": st.column_config.NumberColumn("spread over seeds", format="%.4f"),
            "seeds_lost": st.column_config.NumberColumn(
                "seeds lost", format="%d", help="its trials that failed or were cancelled: ranked on fewer seeds"
            ),
            "trainable_params": st.column_config.NumberColumn("trainable params", format="%d"),
            "peak_memory_mb": st.column_config.NumberColumn("peak MiB", format="%.0f"),
            "train_seconds": st.column_config.NumberColumn("seconds", format="%.1f"),
            "run_id": st.column_config.NumberColumn("best seed's run", format="%d"),
        },
    )
    st.caption(
        "Verdict: *not significant* when a config's mean eval loss is closer to the best's than the spread across "
        "seeds (the larger of the two); *no seed spread* when a config ran with one seed (add repeats to tell)."
    )
    best = store.run(int(table["run_id"].iloc[0]))
    if best is None:
        return
    st.write(f"**Best:** {table['label'].iloc[0]} (run {best['id']}, eval loss {table['eval_loss'].iloc[0]:.4f})")
    col1, col2, col3 = st.columns(3)
    if col1.button("Apply the best to the sidebar", key="lx_exp_apply_best", type="primary"):
        apply_trial(best, experiment)
    col2.download_button(
        "Export the best (adapter_config.json)",
        LoraSettings.from_peft_dict(best["settings"]).to_json() + "\n",
        file_name="adapter_config.json",
        mime="application/json",
        key="lx_exp_best_json",
    )
    if col3.button("Open the best on the Export page", key="lx_exp_best_export"):
        apply_trial(best, experiment, "pages/export.py")


experiments = store.experiments()
st.subheader("Experiments")
if experiments.empty:
    st.caption("No experiments yet: Plan, then Start.")
    st.stop()
ids = experiments["id"].tolist()
if st.session_state.get("lx_exp_pick") not in ids:
    st.session_state.pop("lx_exp_pick", None)  # deleted, or from another store
names = dict(zip(experiments["id"], experiments["name"]))
shown = int(st.selectbox("Experiment", ids, key="lx_exp_pick", format_func=lambda i: f"{i}: {names[i]}"))
experiment = store.experiment(shown)
if experiment is None:  # deleted in another tab since the list was read
    st.session_state.pop("lx_exp_pick", None)
    st.rerun()
spec = experiment["spec"]
active = experiment["queued"] + experiment["running"] > 0
col1, col2, col3 = st.columns([4, 1, 1])
col1.write(
    f"**{experiment['status']}** · {experiment['trials']} trials ({experiment['completed']} completed, "
    f"{experiment['failed']} failed) · {experiment['model']} on {experiment['dataset']} · "
    f"{'Ray' if experiment['runner'] == 'ray' else 'this server'}{' with ASHA' if spec.get('asha') else ''}"
)
if col2.button("Cancel", key="lx_exp_cancel", disabled=experiment["status"] not in ("queued", "running")):
    store.cancel_experiment(shown)
    st.rerun()
if col3.button("Delete", key="lx_exp_delete", disabled=active, help="cancel it first" if active else None):
    try:
        store.delete_experiment(shown)
    except InputError as error:  # a trial was queued again since this page was drawn
        st.error(f"Not deleted: {error}")
    else:
        st.session_state.pop("lx_exp_pick", None)
        st.rerun()
varied = [name for name in spec.get("dimensions", []) if len(spec.get("grid", {}).get(name, ())) > 1]
colour_choices = [*varied, *(["seed"] if int(spec.get("seeds", 1)) > 1 else []), "trial"]
col1, col2 = st.columns(2)
colour_by = col1.selectbox("Colour by", colour_choices, key="lx_exp_colour")
col2.radio("Curves", ["overlaid", "small multiples"], horizontal=True, key="lx_exp_layout")
st.fragment(run_every=POLL_SECONDS if active else None)(live)(shown, active)
if active:
    st.caption("Pareto charts, parallel coordinates and the ranking appear when the last trial ends.")
else:
    results_section(experiment, colour_by)
with st.expander("Every experiment"):
    st.dataframe(
        experiments[
            ["id", "name", "status", "trials", "completed", "failed", "cancelled", "model", "dataset", "runner"]
        ],
        hide_index=True,
        key="lx_exp_table",
    )
st.caption(f"Experiments are stored with the runs in {store.path}. Updated {time.strftime('%H:%M:%S')}.")
