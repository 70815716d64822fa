"""Rank: parameter cost against rank on real models, and what rank buys on a task of known rank."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

import lora_core
from lora_core.counting import rank_curve
from lora_core.errors import InputError
from lora_core.guidelines import RANK_BANDS, rank_band
from lora_core.simulate import reconstruction_error, simulate_rank_sweep
from lora_core.strategies import settings_on_model
from pages.common import add_markers, page_state, rank_sweep_device, show_count, sidebar_strategy, vband, vline

RANKS = list(range(1, 257))
SIM_RANK_CHOICES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]


@st.cache_data(max_entries=64, show_spinner=False)
def cached_sweep(**kwargs):
    return simulate_rank_sweep(**kwargs)


@st.cache_data(max_entries=32, show_spinner=False)
def cached_reconstruction(d: int, true_rank: int, max_rank: int):
    return reconstruction_error(d=d, true_rank=true_rank, max_rank=max_rank)


def on_model(state, inv):
    """The current settings on another model: the sidebar's strategy in that model's names, without
    the layer-specific patterns, which name this model's modules. Custom targets stay as written."""
    strategy = sidebar_strategy()
    if strategy is None:
        return state.settings
    settings, _ = settings_on_model(state.settings.replace(rank_pattern={}, alpha_pattern={}), strategy, inv)
    return settings


state = page_state()
st.title("Rank")
st.write(
    "The rank r sets the adapter's capacity and its cost: each adapted d_out x d_in matrix gets "
    "r x (d_in + d_out) parameters, so cost grows linearly in r while capacity is capped at r."
)
show_count(state)
if state.result is not None:
    st.info(f"r = {state.settings.r}: {rank_band(state.settings.r)} (article guideline)")

st.subheader("Trainable parameters against rank")
others = [m for m in lora_core.catalogue_ids() if m != state.spec.model_id]
compare = st.multiselect("Compare with (up to three)", others, max_selections=3, key="lx_rank_compare")
as_percent = st.toggle("Show % of the model instead of parameters", key="lx_rank_percent")
figure = go.Figure()
for model_id in [state.spec.model_id, *compare]:
    try:
        inv = (
            lora_core.inventory(lora_core.resolve_model(model_id))
            if model_id != state.spec.model_id
            else state.inventory
        )
        settings = state.settings if model_id == state.spec.model_id else on_model(state, inv)
        curve = rank_curve(inv, settings, RANKS)
    except InputError as error:
        st.warning(f"{model_id}: {error}")
        continue
    y = curve["percent"] if as_percent else curve["trainable_params"]
    figure.add_trace(go.Scatter(x=curve["rank"], y=y, mode="lines", name=model_id))
bands = [
    vband(low, high if high > low else 260, f"{low}-{high}" if high > low else f"{low}+")
    for low, high, _label in RANK_BANDS
]
add_markers(figure, *bands, vline(state.settings.r, f"r={state.settings.r}"))
figure.update_layout(
    xaxis_title="rank r",
    yaxis_title="% of all parameters" if as_percent else "trainable parameters",
    height=420,
    legend={"orientation": "h", "y": -0.2},
)
st.plotly_chart(figure, key="lx_rank_cost_chart")
st.caption(
    "Counts are exact (PEFT's rules on each model); other models get the same strategy mapped to their own "
    "module names. Shaded: the article's guideline bands (4-8 simple tasks, 16-32 the sweet spot, "
    "64-128 complex tasks, 256+ rarely necessary)."
)

st.subheader("Rank simulation: fitting an update of known intrinsic rank")
st.write(
    "A synthetic task whose target update has a known rank. Unlike the article (which draws a new target "
    "per rank), every rank here fits **the same target, data and initialisation**, all ranks train together "
    "in one batched tensor program, and each rank's **closed-form optimum** (reduced-rank regression) is drawn "
    "dashed: a curve on its floor has converged; a floor above the noise means the rank lacks capacity."
)
left, right = st.columns(2)
with left:
    d_in = st.select_slider("d_in", [32, 64, 128, 256, 512], value=256, key="lx_sim_d_in")
    d_out = st.select_slider("d_out", [32, 64, 128, 256, 512], value=256, key="lx_sim_d_out")
    true_rank = st.slider("True intrinsic rank", 1, 32, 8, key="lx_sim_true_rank")
    noise = st.slider("Noise std", 0.0, 1.0, 0.1, step=0.05, key="lx_sim_noise")
with right:
    samples = st.slider("Samples", 64, 2000, 500, step=32, key="lx_sim_samples")
    epochs = st.slider("Epochs", 10, 1000, 100, step=10, key="lx_sim_epochs")
    lr = st.select_slider("Learning rate", [0.001, 0.003, 0.01, 0.03, 0.1], value=0.01, key="lx_sim_lr")
    ranks = st.multiselect("Ranks to compare", SIM_RANK_CHOICES, default=[2, 4, 8, 16, 32], key="lx_sim_ranks")
log_y = st.toggle("Log scale", value=True, key="lx_sim_log")
if not ranks:
    st.error("Pick at least one rank to compare.")
    st.stop()
with st.spinner("Training all ranks..."):
    sweep = cached_sweep(
        d_in=d_in,
        d_out=d_out,
        true_rank=true_rank,
        ranks=tuple(sorted(ranks)),
        num_samples=samples,
        epochs=epochs,
        lr=lr,
        noise=noise,
    )
loss_chart = go.Figure()
for index, (rank, group) in enumerate(sweep.groupby("rank")):
    color = f"hsl({(index * 67) % 360}, 65%, 45%)"
    loss_chart.add_trace(go.Scatter(x=group["epoch"], y=group["loss"], name=f"r={rank}", line={"color": color}))
    loss_chart.add_trace(
        go.Scatter(
            x=[0, epochs - 1],
            y=[group["floor"].iloc[0]] * 2,
            name=f"r={rank} optimum",
            line={"color": color, "dash": "dash"},
            showlegend=False,
        )
    )
loss_chart.update_layout(xaxis_title="epoch", yaxis_title="MSE", yaxis_type="log" if log_y else "linear", height=420)
st.plotly_chart(loss_chart, key="lx_rank_sim_chart")
final = sweep.groupby("rank").agg(final_loss=("loss", "last"), optimum=("floor", "first")).reset_index()
final["gap_to_optimum"] = final["final_loss"] - final["optimum"]
final["capacity_bound"] = final["rank"] < true_rank
st.dataframe(final, hide_index=True, key="lx_rank_sim_table")
st.caption(f"This simulation runs on {rank_sweep_device()}.")

st.subheader("Reconstruction error against rank (SVD)")
error = cached_reconstruction(d_in, true_rank, 64)
error_chart = go.Figure(go.Scatter(x=error["rank"], y=error["error"], mode="lines+markers"))
add_markers(error_chart, vline(true_rank, f"true rank {true_rank}", "top right"))
error_chart.update_layout(xaxis_title="approximation rank", yaxis_title="relative Frobenius error", height=360)
st.plotly_chart(error_chart, key="lx_rank_svd_chart")
st.caption("Best rank-r approximation of the rank-k target (Eckart-Young): the error is ~0 from r = k on.")
