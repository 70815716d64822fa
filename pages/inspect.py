"""Inspect: any LoRA adapter's per-module spectra, how much of its rank it uses, a smaller copy, and
how it compares with another adapter of the same base."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from lora_core.adapters import adapter_zip
from lora_core.errors import InputError
from lora_core.inspect import (
    ENERGIES,
    Adapter,
    check_adapter,
    compare_adapters,
    energy_column,
    heatmap,
    inspect_adapter,
    open_adapter,
    open_zip,
    overall,
    plan_right_size,
    prune_unpacked,
    usage,
    write_right_sized,
)
from lora_core.models import local_model_roots
from pages.common import UPLOADS, add_markers, file_upload, hline, page_state, read_upload, run_manager

RUN, FOLDER, HUB_ID, UPLOAD = "Run of the store", "Folder or zip on the server", "Hub id", "Upload a zip"
UPLOAD_KEY = "lx_inspect_upload"
# Each picker's choices: an upload only where the server has a rule for the uploader.
SOURCES = [RUN, FOLDER, HUB_ID, *([UPLOAD] if UPLOAD_KEY in UPLOADS else [])]
HEATMAP_LABELS = {
    "rank_used_90": "share of r holding 90% of the energy",
    "rank_used_99": "share of r holding 99% of the energy",
    "entropy_rank": "entropy effective rank",
    "norm": "update norm ||scale B A||_F",
}
ENERGY_CHOICES = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999]
# Unpacked zips kept under the data folder: the adapter shown and the one compared with it, for a
# few sessions at once; older ones are removed so the folder does not grow without bound.
KEEP_UNPACKED = 6

state = page_state()
store = run_manager().store
st.title("Inspect")
st.write(
    "What an adapter learned, module by module: the singular values of each update (alpha/r) B A, computed "
    "from the r x r factors of B and A: B A itself is never formed (bench/bench_inspect.py times this "
    "against forming it, on a Llama-2-7B-shaped r=64 adapter of 640 MB). "
    "Effective ranks say how much of the configured r the training used; Right-size writes a smaller adapter "
    "that keeps a chosen share of each update's energy; Compare measures whether two adapters learned the "
    "same directions."
)


def source_fields(prefix: str) -> tuple[str, object]:
    """The picker for one adapter: (source kind, what was chosen: run id, text or upload)."""
    kind = st.radio("Adapter from", SOURCES, horizontal=True, key=f"{prefix}_source")
    if kind == RUN:
        runs = store.runs()
        runs = runs[runs["adapter_dir"].notna() & runs["status"].isin(["completed", "cancelled"])]
        if runs.empty:
            st.caption("No finished runs yet: train one on the Fine-tune page, or pick another source.")
            return kind, None
        labels = dict(zip(runs["id"], runs["name"]))
        picked = st.selectbox("Run", list(labels), format_func=lambda r: f"{r}: {labels[r]}", key=f"{prefix}_run")
        return kind, picked
    if kind == UPLOAD:
        return kind, file_upload("Adapter zip (adapter_config.json + adapter_model.safetensors)", UPLOAD_KEY)
    placeholder = "/path/to/adapter or adapter.zip" if kind == FOLDER else "owner/adapter-name"
    return kind, st.text_input(kind, key=f"{prefix}_text", placeholder=placeholder)


def load(kind: str, value: object) -> Adapter:
    """The adapter the picker names. Local paths follow the server's policy
    ($LORA_EXPLORER_MODEL_ROOTS); uploads and zips unpack under the data folder. Raises `InputError`."""
    unpacked = store.data_dir / "inspect"
    prune_unpacked(unpacked, KEEP_UNPACKED)
    if kind == RUN:
        if value is None:
            raise InputError("no finished run to inspect yet: pick another source")
        run = store.run(int(str(value)))
        label = f"run {value}: {run['name']}" if run else f"run {value}"
        return dataclasses.replace(open_adapter(f"run:{value}", store_dir=store.data_dir), label=label)
    if kind == UPLOAD:
        if value is None:
            raise InputError("choose a zip to upload first")
        upload = read_upload(UPLOAD_KEY, value)
        return open_zip(io.BytesIO(upload.data), unpacked / upload.digest[:16], upload.name)
    text = str(value or "").strip()
    if not text:
        raise InputError(f"give a {'folder or .zip path' if kind == FOLDER else 'Hub id (owner/name)'} first")
    if kind == HUB_ID and (text.startswith((".", "/", "~")) or text.count("/") != 1):
        raise InputError(f"{text[:80]} is not a Hub id: it has the form owner/name")
    roots = local_model_roots() if kind == FOLDER else ()
    digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return open_adapter(text, unpack_dir=unpacked / digest, local_roots=roots)


@st.cache_data(max_entries=8, show_spinner="Reading the adapter's spectra…")
def inspected(folder: str, label: str, stamp: tuple[int, float]):
    """`inspect_adapter` of the adapter in `folder`; `stamp` (size, mtime of its weights) makes a
    changed file a new entry."""
    return inspect_adapter(check_adapter(Path(folder), label))


def inspection_of(adapter: Adapter):
    stat = adapter.weights.stat()
    return inspected(str(adapter.folder), adapter.label, (stat.st_size, stat.st_mtime))


def remembered(key: str) -> Adapter | None:
    """The adapter loaded earlier under `key`, checked again (it may have gone), or None."""
    held = st.session_state.get(key)
    if held is None:
        return None
    try:
        return check_adapter(Path(held[0]), held[1])
    except InputError as error:
        st.warning(f"The adapter loaded before can no longer be read: {error}")
        st.session_state.pop(key, None)
        return None


with st.container(border=True):
    kind, value = source_fields("lx_inspect")
    if st.button("Inspect", type="primary", key="lx_inspect_go"):
        try:
            chosen = load(kind, value)
            inspection_of(chosen)
        except InputError as error:
            st.error(f"Not loaded: {error}")
        else:
            st.session_state["lx_inspect_adapter"] = (str(chosen.folder), chosen.label)
            st.session_state.pop("lx_inspect_compared", None)

adapter = remembered("lx_inspect_adapter")
if adapter is None:
    st.info("Pick an adapter and press Inspect.")
    st.stop()
try:
    inspection = inspection_of(adapter)
except InputError as error:
    st.error(f"Cannot inspect {adapter.label}: {error}")
    st.stop()
frame = inspection.modules
whole = overall(inspection)
st.subheader(f"{adapter.label}")
if adapter.base_model:
    st.caption(f"Base model in its config: {adapter.base_model}")
cols = st.columns(4)
cols[0].metric("Updates", f"{whole['updates']:,}")
cols[1].metric("Configured rank (sum of r)", f"{whole['configured_rank']:,}")
for col, energy in zip(cols[2:], ENERGIES):
    column = energy_column(energy)
    col.metric(
        f"Rank used for {energy:.0%} of the energy",
        f"{whole['used_' + column[5:]]:.0%}",
        help=f"sum over updates of the fewest components holding {energy:.0%} of each update's squared "
        f"spectrum ({whole[column]:,}), over the sum of r",
    )

st.subheader("Where the training changed the model")
value_label = st.selectbox("Colour", list(HEATMAP_LABELS), format_func=HEATMAP_LABELS.get, key="lx_inspect_heat_value")
grid = (
    heatmap(inspection, "rank_used", 0.9 if value_label.endswith("90") else 0.99)
    if value_label.startswith("rank_used")
    else heatmap(inspection, value_label)
)
figure = go.Figure(
    go.Heatmap(
        z=grid.to_numpy(),
        x=list(grid.columns),
        y=[str(layer) if layer >= 0 else "outside layers" for layer in grid.index],
        colorscale="Viridis",
        colorbar={"title": HEATMAP_LABELS[value_label].split(" ")[0]},
        hovertemplate="layer %{y}, %{x}: %{z:.3g}<extra></extra>",
    )
)
figure.update_layout(
    xaxis_title="module type",
    yaxis_title="layer",
    yaxis_type="category",
    height=100 + 18 * len(grid.index),
    margin={"t": 20},
)
st.plotly_chart(figure, key="lx_inspect_heatmap")

col1, col2 = st.columns(2)
col1.caption("By module type")
col1.dataframe(usage(inspection, "type"), hide_index=True, key="lx_inspect_by_type")
col2.caption("By depth (layer; -1: outside the layer stack)")
col2.dataframe(usage(inspection, "layer"), hide_index=True, key="lx_inspect_by_layer")

st.subheader("Spectrum of one module")
names = frame["name"].tolist()
picked = st.selectbox("Module", names, key="lx_inspect_module")
singular = inspection.spectra[picked]
energy_share = np.cumsum(singular**2) / max(float((singular**2).sum()), 1e-300)
spectrum = go.Figure()
spectrum.add_trace(go.Bar(x=np.arange(1, len(singular) + 1), y=singular, name="singular value"))
spectrum.add_trace(
    go.Scatter(x=np.arange(1, len(singular) + 1), y=energy_share, name="energy kept", yaxis="y2", mode="lines+markers")
)
spectrum.update_layout(
    xaxis_title="component",
    yaxis_title="singular value of scale B A",
    yaxis2={"title": "share of energy", "overlaying": "y", "side": "right", "range": [0, 1.05]},
    height=360,
    legend={"orientation": "h", "y": -0.25},
)
markers = [hline(energy, f"{energy:.0%}", "bottom right") for energy in ENERGIES]
add_markers(spectrum, *((shape | {"yref": "y2"}, label | {"yref": "y2"}) for shape, label in markers))
st.plotly_chart(spectrum, key="lx_inspect_spectrum")
with st.expander("Every module"):
    st.dataframe(frame.drop(columns=["module"]), hide_index=True, key="lx_inspect_modules")

st.subheader("Right-size")
st.write(
    "The smallest ranks keeping a chosen share of each update's energy (the squared singular values): by "
    "Eckart-Young no rank-k adapter is closer to the update, and the relative error is the square root of the "
    "energy dropped. The truncated adapter's config carries the new r (and `rank_pattern`), with alpha set so "
    "each module keeps its scale; PEFT loads it as it is."
)
col1, col2 = st.columns(2)
keep = col1.select_slider(
    "Energy to keep", ENERGY_CHOICES, value=0.99, format_func=lambda e: f"{e:.2%}", key="lx_inspect_energy"
)
mode = col2.radio(
    "Ranks",
    ["per_module", "global"],
    format_func={"per_module": "per module (rank_pattern)", "global": "one global r"}.get,
    horizontal=True,
    key="lx_inspect_mode",
)
plan = plan_right_size(inspection, float(keep), mode)
cols = st.columns(4)
cols[0].metric("New r", f"{plan.r}", help="the most common new rank; the rest go to rank_pattern")
cols[1].metric("Modules in rank_pattern", f"{sum(rank != plan.r for rank in plan.ranks.values()):,}")
cols[2].metric("Relative error", f"{plan.relative_error:.2e}", help="||all dropped||_F / ||all updates||_F")
cols[3].metric(
    "LoRA parameters",
    f"{plan.parameters_after:,}",
    f"{plan.parameters_after / plan.parameters_before - 1:+.0%}" if plan.parameters_before else None,
    delta_color="off",
)
with st.expander("New rank and error per update"):
    st.dataframe(plan.modules, hide_index=True, key="lx_inspect_plan")
if st.button("Prepare the truncated adapter", key="lx_inspect_prepare"):
    try:
        with tempfile.TemporaryDirectory(prefix="lora-right-size-") as scratch:
            written = write_right_sized(adapter, plan, Path(scratch) / "adapter")
            st.session_state["lx_inspect_zip"] = (adapter.label, keep, mode, adapter_zip(written))
    except InputError as error:
        st.error(f"Not written: {error}")
prepared = st.session_state.get("lx_inspect_zip")
if prepared and prepared[:3] == (adapter.label, keep, mode):
    st.download_button(
        f"Download the right-sized adapter ({len(prepared[3]) / 1e6:,.1f} MB zip)",
        prepared[3],
        file_name=f"right-sized-{str(keep).replace('.', '_')}.zip",
        mime="application/zip",
        key="lx_inspect_download",
    )

st.subheader("Compare with another adapter")
st.write(
    "For every module both adapt: the LoRA paper's subspace similarity (Hu et al. 2021, section 7.2) "
    "phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) of their top singular directions; 1 when one adapter's "
    "top-i directions lie in the other's top-j, about min(i, j)/d for unrelated ones. k is the smaller of "
    "the two 90%-energy ranks."
)
with st.container(border=True):
    other_kind, other_value = source_fields("lx_inspect_other")
    if st.button("Compare", key="lx_inspect_compare"):
        try:
            other = load(other_kind, other_value)
            comparison = compare_adapters(adapter, other)
        except InputError as error:
            st.error(f"Not compared: {error}")
        else:
            st.session_state["lx_inspect_compared"] = (other.label, comparison)
compared = st.session_state.get("lx_inspect_compared")
if compared:
    other_label, comparison = compared
    st.caption(f"{adapter.label} against {other_label}")
    if comparison.note:
        st.warning(comparison.note)
    for which, missing in (("first", comparison.only_first), ("second", comparison.only_second)):
        if missing:
            st.caption(
                f"{len(missing)} modules only in the {which}: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}"
            )
    table = comparison.modules
    st.dataframe(table, hide_index=True, key="lx_inspect_compare_table")
    pick = st.selectbox("phi(i, j) of module", table["name"].tolist(), key="lx_inspect_compare_module")
    phi = comparison.grids[pick]
    grid_figure = go.Figure(
        go.Heatmap(
            z=phi,
            x=np.arange(1, phi.shape[1] + 1),
            y=np.arange(1, phi.shape[0] + 1),
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            hovertemplate="i=%{y}, j=%{x}: phi %{z:.3f}<extra></extra>",
        )
    )
    grid_figure.update_layout(
        xaxis_title=f"j (top directions of {other_label})",
        yaxis_title=f"i (top directions of {adapter.label})",
        height=420,
    )
    st.plotly_chart(grid_figure, key="lx_inspect_phi")
    mean_phi = pd.to_numeric(table["phi_k"]).mean()
    st.caption(
        f"Mean phi(k, k) over modules: {mean_phi:.3f}"
        if np.isfinite(mean_phi)
        else "Mean phi(k, k) over modules: none, no direction to compare (an update is zero)"
    )
