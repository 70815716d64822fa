"""Target modules: strategies side by side, what the current config adapts where, layer-specific ranks."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import lora_core
from lora_core.counting import matched_module_names
from lora_core.errors import InputError
from lora_core.strategies import compare_strategies, strategy_row
from pages.common import page_state, request_apply, show_count, sidebar_strategy


def human_layers(layers) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    layers = sorted(set(layers))
    runs, start = [], layers[0]
    for previous, layer in zip(layers, [*layers[1:], None]):
        if layer != previous + 1:
            runs.append(f"{start}-{previous}" if previous > start else f"{start}")
            start = layer
    return ", ".join(runs)


state = page_state()
settings = state.settings
st.title("Target modules")
st.write(
    "Which layers get adapters decides what the adaptation can change (attention: how tokens route "
    "information; FFN: what is stored and retrieved) and how much it costs."
)
show_count(state)

st.subheader(f"Strategies side by side on {state.spec.model_id} (r={settings.r}, alpha={settings.lora_alpha:g})")
table = compare_strategies(
    state.inventory,
    settings.r,
    settings.lora_alpha,
    settings.replace(rank_pattern={}, alpha_pattern={}, layers_to_transform=None),
)
if sidebar_strategy() is None and state.result is not None:
    custom = strategy_row("Custom (sidebar)", settings, state.result)
    table = pd.concat([table, pd.DataFrame([custom])], ignore_index=True)
role_columns = [c for c in table.columns if c.startswith("role:")]
table[role_columns] = table[role_columns].fillna(0).astype("int64")
chart = go.Figure()
for column in role_columns:
    chart.add_trace(go.Bar(name=column.removeprefix("role:"), x=table["strategy"], y=table[column]))
chart.update_layout(barmode="group", yaxis_title="trainable parameters", height=420, legend_title="module type")
st.plotly_chart(chart, key="lx_targets_chart")
shown = table[
    ["strategy", "targets", "modules", "trainable_params", "percent", "size_fp32_mb", "size_16bit_mb", "note", "error"]
]
st.dataframe(
    shown,
    hide_index=True,
    key="lx_targets_table",
    column_config={
        "trainable_params": st.column_config.NumberColumn("trainable", format="localized"),
        "percent": st.column_config.NumberColumn("% of model", format="%.4f"),
        "size_fp32_mb": st.column_config.NumberColumn("adapter MB fp32", format="%.2f"),
        "size_16bit_mb": st.column_config.NumberColumn("adapter MB fp16/bf16", format="%.2f"),
    },
)
st.caption("Adapter size on disk = trainable parameters x bytes per parameter (safetensors adds a few KB of header).")

if state.result is not None:
    st.subheader("What the current config adapts: layers x module types")
    modules = state.result.modules
    grid = modules.pivot_table(index="role", columns="layer", values="rank", aggfunc="max")
    adaptable = state.inventory.modules
    roles = sorted(set(adaptable.loc[adaptable["kind"] != "other", "role"]) - {"other"})
    layers = sorted(set(adaptable["layer"]))
    grid = grid.reindex(index=roles, columns=layers)  # blank cells: modules the config leaves alone
    heatmap = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[str(c) if c >= 0 else "-" for c in grid.columns],
            y=list(grid.index),
            colorscale="Blues",
            colorbar={"title": "rank"},
            hovertemplate="layer %{x}<br>%{y}<br>rank %{z}<extra></extra>",
        )
    )
    heatmap.update_layout(xaxis_title="layer", height=120 + 32 * len(grid.index), xaxis_type="category")
    st.plotly_chart(heatmap, key="lx_targets_heatmap")

st.subheader("Layer-specific ranks (rank_pattern / alpha_pattern, layers_to_transform)")
st.write(
    "Keys are regexes matched against the end of each module name (PEFT: `(.*\\.)?(KEY)$`); the first key "
    "that matches wins. Empty rank or alpha cells fall back to the sidebar's r and alpha."
)
patterns = pd.DataFrame(
    [
        {
            "key": key,
            "rank": st.session_state["lx_rank_pattern"].get(key),
            "alpha": st.session_state["lx_alpha_pattern"].get(key),
        }
        for key in dict.fromkeys([*st.session_state["lx_rank_pattern"], *st.session_state["lx_alpha_pattern"]])
    ],
    columns=["key", "rank", "alpha"],
).astype({"key": "string", "rank": "Int64", "alpha": "Float64"})
edited = st.data_editor(patterns, num_rows="dynamic", hide_index=True, key="lx_pattern_editor")
layers_total = int(state.inventory.facts["layers"] or 0)
limit = st.toggle(
    "Adapt only a range of layers (layers_to_transform)",
    value=st.session_state["lx_layers"] is not None,
    key="lx_limit_layers",
)
layer_range = None
if limit and layers_total > 1:
    chosen = st.session_state["lx_layers"]
    low, high = (min(chosen), max(chosen)) if chosen else (0, layers_total - 1)
    low, high = min(max(low, 0), layers_total - 1), min(max(high, 0), layers_total - 1)
    if chosen and tuple(chosen) != tuple(range(low, high + 1)):
        # an import or another model's range: shown as is; the slider below only replaces it on Apply
        st.info(
            f"layers_to_transform is {human_layers(chosen)}, not a range of this model's {layers_total} layers: "
            "Apply replaces it with the range below."
        )
    low, high = st.slider("Layers", 0, layers_total - 1, (low, high), key="lx_layer_range")
    layer_range = tuple(range(low, high + 1))
if st.button("Apply patterns and layers", key="lx_apply_patterns", type="primary"):
    rank_pattern, alpha_pattern, problems = {}, {}, []
    for row in edited.to_dict(orient="records"):
        key = (row.get("key") or "").strip() if isinstance(row.get("key"), str) else ""
        if not key:
            continue
        if pd.notna(row.get("rank")):
            rank_pattern[key] = int(row["rank"])
        if pd.notna(row.get("alpha")):
            alpha_pattern[key] = float(row["alpha"])
    candidate = settings.replace(
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=layer_range
    )
    try:
        lora_core.count_lora_params(state.inventory, candidate)
    except InputError as error:
        st.error(f"Not applied, the current settings are kept: {error}")
    else:
        request_apply({"lx_rank_pattern": rank_pattern, "lx_alpha_pattern": alpha_pattern, "lx_layers": layer_range})

st.subheader("Which concrete modules the targets match")
problems = settings.problems()  # matching compiles the settings' regexes: only valid settings reach it
try:
    if problems:
        raise InputError(problems[0])
    adapted, left_out = matched_module_names(state.inventory, settings)
except InputError as error:
    st.error(str(error))
else:
    col1, col2 = st.columns(2)
    col1.metric("Adapted", len(adapted))
    col2.metric("Adaptable but left out", len(left_out))
    col1.dataframe(pd.DataFrame({"adapted": adapted}), hide_index=True, key="lx_targets_adapted", height=260)
    col2.dataframe(pd.DataFrame({"left out": left_out}), hide_index=True, key="lx_targets_left", height=260)
    if state.inventory.output_embedding in left_out and settings.target_modules == "all-linear":
        st.caption(f"`all-linear` leaves out the output head `{state.inventory.output_embedding}` (PEFT's rule).")
