"""Fine-tune: short real LoRA runs whose loss curves stream in, next to every run tried before."""

from __future__ import annotations

import dataclasses
import json
import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import lora_core
from lora_core.adapters import adapter_zip, effective_ranks
from lora_core.errors import InputError
from lora_core.store import ACTIVE
from lora_core.training import EMBEDDED, TrainConfig, memory_setup
from lora_core.training.trackers import TRACKERS
from pages.common import (
    MODEL_SOURCES,
    chosen_dataset,
    config_name,
    dataset_fields,
    follow_metrics,
    page_state,
    run_manager,
    run_name,
    store_upload,
    training_model,
    training_settings,
)

# A poll reads at most these runs, however many the store holds: the curves drawn at once, and the
# active runs given a progress bar (the rest of a long queue is counted).
MAX_SHOWN, MAX_PROGRESS = 20, 8
# Seconds between polls while a run is active. Each poll costs the watching browser a redraw (and a
# new plotly chart when a point came), CPU that a run on the same machine would train with; a step
# on the CPU takes about that long anyway (bench/bench_live.py measures both sides).
POLL_SECONDS = 2.0

state = page_state()
manager = run_manager()
store = manager.store
st.title("Fine-tune")
st.write(
    "Train the chosen LoRA config for a few minutes and watch the loss. Runs queue one at a time in a "
    "background worker; finished runs stay (with their settings and losses) across reloads, tabs and restarts."
)


def planned_memory(model_choice: str, settings: lora_core.LoraSettings, config: TrainConfig) -> str:
    """'; estimated peak at most ... MiB' for the embedded or a catalogue model on this server's
    device (sequences padded to the full length: the run's own estimate uses its longest example)."""
    from lora_core.devices import pick_device
    from lora_core.memory import estimate_memory

    device = pick_device()
    if device == "mps" or (model_choice != EMBEDDED and model_choice not in lora_core.catalogue_ids()):
        return ""
    try:
        spec = lora_core.resolve_model(config_name(model_choice))
        setup = memory_setup(config, config.seq_len, device)
        estimate = estimate_memory(lora_core.inventory(spec), settings, setup)
    except InputError:
        return ""
    return f"; estimated peak at most {estimate.peak_bytes / 2**20:,.0f} MiB at {config.seq_len} tokens"


with st.form("lx_train_form"):
    col1, col2 = st.columns(2)
    model_source = col1.radio("Model", MODEL_SOURCES, key="lx_train_model_source")
    model_text = col1.text_input("Hub id or local folder (causal LM)", key="lx_train_model_text")
    data_source, task, upload, hub_dataset_id_text = dataset_fields("lx_train", col2)
    col3, col4, col5, col6, col7 = st.columns(5)
    steps = col3.number_input("Steps", 1, 2000, 60, key="lx_train_steps")
    learning_rate = col4.select_slider(
        "Learning rate", [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3], value=1e-3, key="lx_train_lr"
    )
    batch_size = col5.select_slider("Batch size", [1, 2, 4, 8, 16], value=4, key="lx_train_batch")
    seq_len = col6.select_slider("Sequence length", [64, 128, 256, 512, 1024], value=128, key="lx_train_seq")
    eval_every = col7.number_input("Eval every", 1, 500, 10, key="lx_train_eval_every")
    col8, col9 = st.columns(2)
    run_name_text = col8.text_input("Run name (optional)", key="lx_train_name")
    trackers = col9.multiselect(
        "Also report to (optional)",
        list(TRACKERS),
        key="lx_train_report_to",
        help="Trainer's report_to: the tracker must be installed and configured on the server (MLFLOW_TRACKING_URI, "
        "wandb login); TensorBoard writes to the data folder's tensorboard/run-<id>.",
    )
    submitted = st.form_submit_button("Start", type="primary")

if submitted:
    checked, settings, note = None, None, ""
    try:
        model_choice = training_model(model_source, model_text)
        dataset, checked = chosen_dataset(data_source, task, "lx_train_upload", upload, hub_dataset_id_text)
        name = run_name(run_name_text)
        if state.error:
            raise InputError(f"the sidebar settings are invalid: {state.error}")
        settings, note = training_settings(state, model_choice)
        config = TrainConfig(
            model=model_choice,
            dataset=dataset,
            steps=int(steps),
            learning_rate=float(learning_rate),
            batch_size=int(batch_size),
            seq_len=int(seq_len),
            eval_every=int(eval_every),
            report_to=tuple(trackers),
        )
        problems = config.problems() + settings.problems()  # what submit refuses, as one line here
        if problems:
            raise InputError("; ".join(problems))
        if checked is not None:
            config = dataclasses.replace(config, dataset=f"upload:{store_upload(checked, store.data_dir)}")
        run_id = manager.submit(config, settings, name)  # its preflight: device, dataset, model
    except InputError as error:
        st.error(f"Not started: {error}")
    else:
        st.session_state.setdefault("lx_overlay", [])
        st.session_state["lx_overlay"] = [*st.session_state["lx_overlay"], run_id]
        details = "; ".join(part for part in (f"dataset {checked.name}" if checked else "", note) if part)
        st.success(
            f"Run {run_id} queued"
            + (f" ({details})" if details else "")
            + planned_memory(model_choice, settings, config)
        )


def progress_panel(active: pd.DataFrame, metrics: dict[int, pd.DataFrame], not_shown: int) -> None:
    for _, run in active.iterrows():
        points = metrics.get(run["id"])
        train = points[points["kind"] == "train"] if points is not None else points
        total = int(json.loads(run["config"])["steps"])
        done = int(train["step"].max()) if train is not None and len(train) else 0
        elapsed = float(train["elapsed"].max()) if done else 0.0
        rate = float(train["tokens_per_s"].tail(5).mean()) if done else 0.0
        per_step = elapsed / done if done else 0.0
        cols = st.columns([4, 1])
        label = f"Run {run['id']} {run['status']}: step {done}/{total}"
        if done:
            label += f" · {rate:,.0f} tokens/s · {elapsed:,.0f} s elapsed · ~{per_step * (total - done):,.0f} s left"
        cols[0].progress(min(done / total, 1.0), text=label)
        if cols[1].button("Cancel", key=f"lx_cancel_{run['id']}"):
            manager.cancel(int(run["id"]))
    if not_shown > 0:
        st.caption(f"and {not_shown:,} more runs queued or running")


def loss_figure(labels: dict[int, str], metrics: dict[int, pd.DataFrame], seqs: dict[int, int]) -> go.Figure:
    """The overlaid loss curves of the runs in `labels`. Built again only when a point, a label or
    an axis changed: a poll with nothing new sends the same figure, which the browser keeps as drawn."""
    x_axis = st.session_state.get("lx_train_x", "steps")
    log_y = st.session_state.get("lx_train_log", False)
    key = (x_axis, log_y, tuple((run_id, label, seqs[run_id]) for run_id, label in labels.items()))
    cached = st.session_state.get("lx_live_figure")
    if cached is not None and cached[0] == key:
        return cached[1]
    figure = go.Figure()
    for run_id, label in labels.items():
        for kind, dash in (("train", None), ("eval", "dash")):
            points = metrics[run_id][metrics[run_id]["kind"] == kind] if run_id in metrics else None
            if points is None or points.empty:
                continue
            x = points["step"] if x_axis == "steps" else points["tokens"]
            figure.add_trace(
                go.Scatter(
                    x=x, y=points["loss"], mode="lines+markers" if kind == "eval" else "lines",
                    name=f"{label} ({kind})", line={"dash": dash},
                )
            )  # fmt: skip
    figure.update_layout(
        xaxis_title="step" if x_axis == "steps" else "training tokens",
        yaxis_title="loss",
        yaxis_type="log" if log_y else "linear",
        height=440,
        legend={"orientation": "h", "y": -0.25},
    )
    st.session_state["lx_live_figure"] = (key, figure)
    return figure


def live(polling: bool, any_runs: bool) -> None:
    """The progress bars and the loss curves: what the fragment redraws each poll. A poll reads the
    rows of the runs it shows (picked, and the first active ones) and only their points written
    since the last poll, so its work does not grow with the store."""
    active_ids = store.active_run_ids()
    picked = st.session_state.get("lx_overlay", [])
    runs = store.runs(list(dict.fromkeys([*picked[:MAX_SHOWN], *active_ids[:MAX_PROGRESS]])))
    held = follow_metrics(store, runs["id"].tolist(), "lx_live_metrics")
    metrics = {run_id: frame for run_id, (_, frame) in held.items() if frame is not None}
    active = runs[runs["status"].isin(ACTIVE)]
    progress_panel(active, metrics, len(active_ids) - len(active))
    if polling and not active_ids:
        st.rerun()  # the last active run ended: the full page shows how, and the polling stops
    names = dict(zip(runs["id"], runs["name"]))
    labels = {run_id: f"{run_id}: {names[run_id]}" for run_id in picked[:MAX_SHOWN] if run_id in names}
    if labels:
        seqs = {run_id: seq for run_id, (seq, _) in held.items()}
        st.plotly_chart(loss_figure(labels, metrics, seqs), key="lx_train_chart")
        if len(picked) > MAX_SHOWN:
            st.caption(f"The first {MAX_SHOWN} of the {len(picked)} runs picked are drawn.")
    elif any_runs:
        st.info("Pick runs below to overlay their loss curves.")


runs = store.runs()
active_now = bool(runs["status"].isin(ACTIVE).any())
st.subheader("Loss curves")
col1, col2 = st.columns(2)
col1.radio("x axis", ["steps", "tokens"], horizontal=True, key="lx_train_x")
col2.toggle("Log scale", key="lx_train_log")
st.fragment(run_every=POLL_SECONDS if active_now else None)(live)(active_now, not runs.empty)

st.subheader("Runs")
if runs.empty:
    st.caption("No runs yet: press Start.")
    st.stop()
table = runs[
    [
        "id",
        "name",
        "status",
        "model",
        "dataset",
        "trainable_params",
        "initial_eval_loss",
        "final_train_loss",
        "final_eval_loss",
        "device",
        "peak_memory_mb",
        "memory_estimate_mb",
        "error",
    ]
].assign(estimate_error=(runs["memory_estimate_mb"] / runs["peak_memory_mb"] - 1) * 100)
st.dataframe(
    table,
    hide_index=True,
    key="lx_runs_table",
    column_config={
        "peak_memory_mb": st.column_config.NumberColumn("peak MiB (measured)", format="%.0f"),
        "memory_estimate_mb": st.column_config.NumberColumn("peak MiB (estimated)", format="%.0f"),
        "estimate_error": st.column_config.NumberColumn("estimate error %", format="%+.1f"),
    },
)
ids = runs["id"].tolist()
st.multiselect(
    "Overlay runs", ids, default=[r for r in st.session_state.get("lx_overlay", []) if r in ids],
    format_func=lambda r: f"{r}: {runs.loc[runs['id'] == r, 'name'].iloc[0]}", key="lx_overlay_picker",
    on_change=lambda: st.session_state.update(lx_overlay=list(st.session_state["lx_overlay_picker"])),
)  # fmt: skip

st.subheader("Manage a run")
selected = st.selectbox(
    "Run", ids, format_func=lambda r: f"{r}: {runs.loc[runs['id'] == r, 'name'].iloc[0]}", key="lx_run_pick"
)
run = store.run(int(selected))
col1, col2, col3 = st.columns([3, 1, 1])
new_name = col1.text_input("Name", value=run["name"], key=f"lx_rename_text_{selected}")
if col2.button("Rename", key="lx_rename"):
    try:
        name = run_name(new_name)
        if name is None:
            raise InputError("a run name cannot be empty")
    except InputError as error:
        st.error(f"Not renamed: {error}")
    else:
        store.rename(int(selected), name)
        st.rerun()
active = run["status"] in ("queued", "running")
deleting = col3.button("Delete", key="lx_delete", disabled=active, help="cancel the run first" if active else None)
if deleting and not active:  # the store refuses to delete an active run
    store.delete(int(selected))
    st.session_state["lx_overlay"] = [r for r in st.session_state.get("lx_overlay", []) if r != selected]
    st.rerun()
if run.get("peak_memory_mb"):
    kind = "max allocated" if str(run.get("device") or "").startswith("cuda") else "peak RSS"
    col1, col2 = st.columns(2)
    col1.metric(f"Measured peak ({kind})", f"{run['peak_memory_mb']:,.0f} MiB")
    if run.get("memory_estimate_mb"):
        error = run["memory_estimate_mb"] / run["peak_memory_mb"] - 1
        col2.metric(
            "Estimated peak",
            f"{run['memory_estimate_mb']:,.0f} MiB",
            f"{error:+.1%} vs measured",
            delta_color="off",
            help=f"lora_core.memory for this run's batch, its longest example ({run.get('longest_seq')} tokens) "
            "and its evaluation batch",
        )
with st.expander("Settings of this run"):
    st.json({"lora": run["settings"], "training": run["config"]})
if run["status"] in ("completed", "cancelled") and run.get("adapter_dir"):
    try:
        payload = adapter_zip(run["adapter_dir"])
    except FileNotFoundError as error:
        st.warning(str(error))
    else:
        st.download_button(
            "Download adapter (zip)",
            payload,
            file_name=f"lora-run-{selected}.zip",
            mime="application/zip",
            key="lx_adapter_zip",
        )
        try:
            summary, spectra = effective_ranks(run["adapter_dir"])
        except InputError as error:  # a damaged adapter folder: the download above still works
            st.warning(f"No spectra for this run's adapter: {error}")
            summary, spectra = pd.DataFrame(), pd.DataFrame()
        if not summary.empty:
            st.subheader("Effective rank: how much of r the run used")
            st.write(
                "Singular values of each adapted module's scaled update (alpha/r) B A. Effective rank = components "
                "holding 90% of the update's energy."
            )
            st.dataframe(summary, hide_index=True, key="lx_effective_rank_table")
            st.caption(
                f"The Inspect page shows this adapter (run {selected}) as a heatmap, right-sizes and compares it."
            )
            spectrum = go.Figure()
            for module, group in list(spectra.groupby("module"))[:12]:
                spectrum.add_trace(
                    go.Scatter(x=group["index"], y=group["singular_value"], name=module, mode="lines+markers")
                )
            spectrum.update_layout(xaxis_title="component", yaxis_title="singular value", yaxis_type="log", height=380)
            st.plotly_chart(spectrum, key="lx_spectrum_chart")
elif run["status"] == "failed":
    st.error(f"Run {selected} failed: {run['error']}")
st.caption(
    f"Runs are stored in {store.path} (set LORA_EXPLORER_DATA to move them). Updated {time.strftime('%H:%M:%S')}."
)
