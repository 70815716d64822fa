"""Dropout: the variance lora_dropout injects into the LoRA branch (the article's histograms), and a
study of whether it lowers held-out loss, by rank and training-set size."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from lora_core.dropout_study import (
    DEFAULT_STUDY,
    PLACEMENTS,
    DropoutStudy,
    dropout_findings,
    dropout_table,
    run_dropout_study,
)
from lora_core.errors import InputError
from lora_core.guidelines import dropout_advice
from lora_core.simulate import dropout_histogram, simulate_dropout
from pages.common import add_markers, hline, page_state, rank_sweep_device, show_count, simulation_device

RATES = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
STUDY_RANKS = [1, 2, 4, 8, 16, 32, 64]
STUDY_SAMPLES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@st.cache_data(max_entries=64, show_spinner=False)
def cached_dropout(d: int, rank: int, rates: tuple[float, ...], passes: int):
    """The statistics and the binned outputs: only the bins reach the browser."""
    stats, samples = simulate_dropout(d_in=d, d_out=d, rank=rank, dropout_rates=rates, num_forward=passes)
    return stats, dropout_histogram(samples)


@st.cache_data(max_entries=16, show_spinner=False)
def cached_study(**fields):
    """The study's curves (a few tens of thousands of rows), its per-cell table and its findings."""
    curves = run_dropout_study(DropoutStudy(**fields))
    table = dropout_table(curves)
    return curves, table, dropout_findings(table)


state = page_state()
settings = state.settings
st.title("Dropout")
st.write(
    "PEFT applies lora_dropout to the layer's **input**, before A: h = W x + (alpha / r) B A Dropout(x) "
    "(`lora_B(lora_A(dropout(x))) * scaling`). The seed article writes B Dropout(A x), dropping rank "
    "components; the histograms below follow the article's form, the study at the bottom simulates PEFT's "
    "(and the article's, to compare). Kept elements are scaled by 1/(1-p), so the mean is unchanged."
)
show_count(state)
advice = dropout_advice(settings.r, settings.lora_dropout)
if advice:
    st.warning(advice)

col1, col2, col3 = st.columns(3)
rank = col1.slider("Rank", 1, 128, value=min(settings.r, 128), key="lx_drop_rank")
dim = col2.select_slider("Layer width d", [64, 128, 256, 512], value=256, key="lx_drop_d")
passes = col3.select_slider("Forward passes", [100, 500, 1000, 5000], value=1000, key="lx_drop_passes")
defaults = sorted({0.0, 0.05, 0.1, 0.2, round(settings.lora_dropout, 2)})
rates = st.multiselect("Dropout rates", sorted({*RATES, *defaults}), default=defaults, key="lx_drop_rates")
if not rates:
    st.error("Pick at least one dropout rate.")
    st.stop()
stats, bins = cached_dropout(dim, rank, tuple(sorted(rates)), passes)

histogram = go.Figure()
width = float(bins["right"].iloc[0] - bins["left"].iloc[0])
for rate, group in bins.groupby("dropout"):
    histogram.add_trace(go.Bar(x=group["center"], y=group["count"], width=width, name=f"p={rate:g}", opacity=0.55))
histogram.update_layout(barmode="overlay", bargap=0, xaxis_title="LoRA branch output", yaxis_title="count", height=420)
st.plotly_chart(histogram, key="lx_drop_hist")
st.caption(
    f"{passes:,} forward passes of one input per rate, all in one vectorised tensor program ({simulation_device()})."
)

st.subheader("Statistics (article Out[19])")
st.dataframe(stats, hide_index=True, key="lx_drop_stats")

st.subheader("Expected active rank r(1-p), in the article's placement")
active = go.Figure(go.Bar(x=[f"p={p:g}" for p in stats["dropout"]], y=stats["expected_active_rank"]))
add_markers(active, hline(4, "4 components"))
active.update_layout(yaxis_title="active rank components", height=320)
st.plotly_chart(active, key="lx_drop_active")
st.caption(
    "In the article's B Dropout(A x), a rank-64 adapter at p=0.1 keeps ~58 components per step and a rank-4 "
    "adapter ~3.6. PEFT drops input features instead, so all r components stay active; what dropout does to "
    "held-out loss there is measured by the study below."
)

st.subheader("Dropout study: does it lower held-out loss?")
st.write(
    "A regression task with a target update of true rank "
    f"{DEFAULT_STUDY.true_rank} on d = {DEFAULT_STUDY.d} inputs and noise, learned by a rank-r adapter from n "
    "samples: Adam with a linear decay, fresh dropout masks each step, evaluation without dropout. The "
    "held-out loss is the exact expected loss on fresh data. Every (rank, rate, n, seed) trains together "
    "in one batched tensor program; dropout 0 is always included as the baseline."
)
left, right = st.columns(2)
with left:
    study_ranks = st.multiselect("Ranks", STUDY_RANKS, default=list(DEFAULT_STUDY.ranks), key="lx_study_ranks")
    study_rates = st.multiselect(
        "Dropout rates (0 is always run)", RATES[1:], default=list(DEFAULT_STUDY.rates[1:]), key="lx_study_rates"
    )
    study_samples = st.multiselect(
        "Training samples n", STUDY_SAMPLES, default=list(DEFAULT_STUDY.samples), key="lx_study_samples"
    )
with right:
    seeds = st.slider("Seeds", 2, 6, DEFAULT_STUDY.seeds, key="lx_study_seeds")
    noise = st.select_slider("Noise std", [0.25, 0.5, 1.0, 2.0], value=DEFAULT_STUDY.noise, key="lx_study_noise")
    steps = st.select_slider("Steps", [100, 300, 1000], value=DEFAULT_STUDY.steps, key="lx_study_steps")
    placement = st.radio(
        "Dropout placement", list(PLACEMENTS), format_func=PLACEMENTS.get, horizontal=True, key="lx_study_placement"
    )
fields = {
    "ranks": tuple(study_ranks),
    "rates": (0.0, *study_rates),
    "samples": tuple(study_samples),
    "seeds": seeds,
    "noise": noise,
    "steps": steps,
    "placement": placement,
}
try:
    with st.spinner("Training every configuration..."):
        curves, table, findings = cached_study(**fields)
except InputError as error:
    st.error(f"Study: {error}")
    st.stop()

st.markdown("**What the study says about the article's claims**")
for finding in findings:
    st.markdown(f"- *{finding.claim}*: **{finding.verdict}**. {finding.sentence}")

ranks, sizes, rates = (
    sorted(table["rank"].unique()),
    sorted(table["samples"].unique()),
    sorted(curves["dropout"].unique()),
)
final = curves[curves["step"] == curves["step"].max()]
means = final.groupby(["rank", "samples", "dropout"])["heldout_loss"].mean()
maps = make_subplots(rows=1, cols=len(ranks), subplot_titles=[f"r = {r}" for r in ranks], shared_yaxes=True)
for column, rank in enumerate(ranks, start=1):
    grid = means.loc[rank].unstack("dropout")  # (samples, rates)
    change = (grid.div(grid[0.0], axis=0) - 1) * 100
    maps.add_trace(
        go.Heatmap(
            x=[f"p={p:g}" for p in grid.columns],
            y=[f"n={n}" for n in grid.index],
            z=change.to_numpy(),
            customdata=grid.to_numpy(),
            zmid=0,
            colorscale="RdBu_r",
            coloraxis="coloraxis",
            hovertemplate="%{y}, %{x}: held-out %{customdata:.3f} (%{z:+.1f}% vs p=0)<extra></extra>",
        ),
        row=1,
        col=column,
    )
maps.update_layout(coloraxis={"colorscale": "RdBu_r", "cmid": 0, "colorbar": {"title": "% vs p=0"}}, height=380)
st.plotly_chart(maps, key="lx_study_map")
st.caption(
    "Final held-out loss relative to dropout 0 at the same rank and n (mean over seeds): blue is lower, "
    "better. Hover for the loss itself."
)

st.dataframe(table, hide_index=True, key="lx_study_table")
st.caption(
    "Per (rank, n): the rate with the lowest mean held-out loss, its gain over p=0, the seed spread (max-min "
    "over seeds) and whether the gain exceeds it and 1% (`clear`)."
)

pick_rank, pick_n = st.columns(2)
curve_rank = pick_rank.selectbox("Curves for rank", ranks, index=len(ranks) - 1, key="lx_study_curve_rank")
curve_n = pick_n.selectbox("and n", sizes, index=min(1, len(sizes) - 1), key="lx_study_curve_n")
chosen = curves[(curves["rank"] == curve_rank) & (curves["samples"] == curve_n)]
chosen = chosen.groupby(["dropout", "step"])[["train_loss", "heldout_loss"]].mean().reset_index()
curve_chart = go.Figure()
for index, (rate, group) in enumerate(chosen.groupby("dropout")):
    color = f"hsl({(index * 67) % 360}, 65%, 45%)"
    curve_chart.add_trace(
        go.Scatter(x=group["step"], y=group["heldout_loss"], name=f"p={rate:g} held-out", line={"color": color})
    )
    curve_chart.add_trace(
        go.Scatter(
            x=group["step"], y=group["train_loss"], name=f"p={rate:g} train", line={"color": color, "dash": "dot"}
        )
    )
curve_chart.update_layout(xaxis_title="step", yaxis_title="MSE (no dropout)", yaxis_type="log", height=420)
st.plotly_chart(curve_chart, key="lx_study_curves")
st.caption(f"Mean over seeds; dotted: loss on the n training samples, solid: held-out. Runs on {rank_sweep_device()}.")
