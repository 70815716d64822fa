"""Dropout: the variance lora_dropout injects into the LoRA branch, and what it leaves of the rank."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from lora_core.guidelines import dropout_advice
from lora_core.simulate import dropout_histogram, simulate_dropout
from pages.common import add_markers, hline, page_state, show_count, simulation_device

RATES = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]


@st.cache_data(max_entries=64, show_spinner=False)
def cached_dropout(d: int, rank: int, rates: tuple[float, ...], passes: int):
    """The statistics and the binned outputs: only the bins reach the browser."""
    stats, samples = simulate_dropout(d_in=d, d_out=d, rank=rank, dropout_rates=rates, num_forward=passes)
    return stats, dropout_histogram(samples)


state = page_state()
settings = state.settings
st.title("Dropout")
st.write(
    "LoRA dropout acts on A x before B: h = W x + (alpha / r) B Dropout(A x). Kept elements are scaled by "
    "1/(1-p), so the mean is unchanged but each training step sees a different subset of the rank."
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

st.subheader("Expected active rank r(1-p)")
active = go.Figure(go.Bar(x=[f"p={p:g}" for p in stats["dropout"]], y=stats["expected_active_rank"]))
add_markers(active, hline(4, "4 components"))
active.update_layout(yaxis_title="active rank components", height=320)
st.plotly_chart(active, key="lx_drop_active")
st.caption(
    "A rank-64 adapter at p=0.1 keeps ~58 components per step; a rank-4 adapter keeps ~3.6. Dropout bites "
    "hardest on low ranks: use lower rates there."
)
