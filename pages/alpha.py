"""Alpha: the scale of the LoRA branch, alpha/r (or alpha/sqrt(r) with rsLoRA)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from lora_core.guidelines import alpha_advice
from lora_core.settings import lora_scale
from lora_core.simulate import alpha_output_stats, scale_grid
from pages.common import page_state, show_count

ALPHAS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@st.cache_data(max_entries=64, show_spinner=False)
def cached_stats(rank: int, alphas: tuple[float, ...], use_rslora: bool, d: int):
    return alpha_output_stats(d_in=d, d_out=d, rank=rank, alphas=alphas, use_rslora=use_rslora)


state = page_state()
settings = state.settings
st.title("Alpha")
st.write(
    "The adapted layer computes h = W x + (alpha / r) B A x. Alpha scales the LoRA branch; the ratio "
    "alpha/r is what training feels. rsLoRA uses alpha/sqrt(r) so the scale does not shrink as r grows."
)
show_count(state)

rslora = st.toggle("rsLoRA (alpha / sqrt(r))", value=settings.use_rslora, key="lx_alpha_rslora")
current_scale = lora_scale(settings.r, settings.lora_alpha, rslora)
st.metric("Effective scale of the current config", f"{current_scale:.3f}")
advice = alpha_advice(settings.replace(use_rslora=rslora))
if advice:
    st.warning(advice)

st.subheader("Effective scale over alpha x rank")
grid = scale_grid(ALPHAS, RANKS, rslora).pivot(index="alpha", columns="rank", values="scale")
heatmap = go.Figure(
    go.Heatmap(
        z=grid.to_numpy(),
        x=[str(r) for r in grid.columns],
        y=[str(int(a)) for a in grid.index],
        colorscale="Viridis",
        text=[[f"{v:.3g}" for v in row] for row in grid.to_numpy()],
        texttemplate="%{text}",
        colorbar={"title": "scale"},
        zmin=0,
        zmax=8,
    )
)
if settings.r in RANKS and settings.lora_alpha in ALPHAS:
    heatmap.add_trace(
        go.Scatter(
            x=[str(settings.r)],
            y=[str(int(settings.lora_alpha))],
            mode="markers",
            marker={"symbol": "square-open", "size": 34, "color": "red", "line": {"width": 3}},
            name="current config",
        )
    )
heatmap.update_layout(
    xaxis_title="rank r", yaxis_title="alpha", height=460, xaxis_type="category", yaxis_type="category"
)
st.plotly_chart(heatmap, key="lx_alpha_heatmap")
st.caption("Colour capped at 8. The diagonal alpha = r is scale 1 (without rsLoRA).")

st.subheader("Output statistics (article Out[8], computed live)")
col1, col2 = st.columns(2)
stats_rank = col1.slider("Rank for the statistics", 1, 256, value=min(settings.r, 256), key="lx_alpha_stats_rank")
dim = col2.select_slider("Layer width d", [128, 256, 512, 1024], value=512, key="lx_alpha_stats_d")
alphas = st.multiselect("Alphas", ALPHAS, default=[4, 8, 16, 32, 64], key="lx_alpha_stats_alphas")
if alphas:
    stats = cached_stats(stats_rank, tuple(sorted(float(a) for a in alphas)), rslora, dim)
    st.dataframe(stats, hide_index=True, key="lx_alpha_stats_table")
    ratio_chart = go.Figure(go.Scatter(x=stats["scale"], y=stats["lora_ratio"], mode="lines+markers"))
    ratio_chart.update_layout(xaxis_title="effective scale", yaxis_title="LoRA / original output std", height=320)
    st.plotly_chart(ratio_chart, key="lx_alpha_ratio_chart")
    st.caption("The LoRA/original ratio is linear in the scale, exactly as h = Wx + scale * BAx predicts.")

st.subheader("Fixed alpha across ranks (article Out[11])")
fixed = st.select_slider("Fixed alpha", [8, 16, 32, 64], value=32, key="lx_alpha_fixed")
table = scale_grid([fixed], [4, 8, 16, 32, 64], rslora)[["rank", "alpha", "scale"]]
st.dataframe(table, hide_index=True, key="lx_alpha_fixed_table")
st.caption("With alpha fixed, lower ranks get a larger scale: a common practice that partly offsets their capacity.")
