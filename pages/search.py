"""Search spaces: the article's efficiency / balanced / thorough grids, counted on the current model."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

import lora_core
from lora_core.errors import InputError
from lora_core.strategies import SEARCH_SPACES, adapt_to_model, count_search_space, search_space
from pages.common import apply_settings, page_state, show_count


@st.cache_data(max_entries=32, show_spinner=False)
def cached_space(_inventory, key: str, priority: str):
    return count_search_space(_inventory, priority)


state = page_state()
st.title("Search spaces")
st.write(
    "The article's hyperparameter grids (In[26]): search target modules first, then rank (powers of 2), then "
    "alpha as a multiple of r, then dropout. Every configuration is counted exactly on the current model."
)
show_count(state)
priority = st.radio("Priority", list(SEARCH_SPACES), index=1, horizontal=True, key="lx_search_priority")
try:
    table = cached_space(state.inventory, state.spec.key, priority)
except InputError as error:
    st.error(f"This grid cannot be counted on {state.spec.model_id}: {error}")
    st.stop()
st.write(f"**{len(table)} configurations** on {state.spec.model_id}.")
if st.button(
    "Run these", key="lx_search_run", help="open the Experiments page with this search space as the grid, to train"
):
    st.session_state["lx_exp_space_request"] = priority
    st.switch_page("pages/experiments.py")

scatter = go.Figure()
for target_set, group in table.groupby("target_set"):
    scatter.add_trace(
        go.Scatter(
            x=group["r"],
            y=group["trainable_params"],
            mode="markers",
            name=target_set,
            text=[f"alpha={a:g}, dropout={d:g}" for a, d in zip(group["lora_alpha"], group["lora_dropout"])],
            marker={"size": 10},
        )
    )
scatter.update_layout(xaxis_title="rank r", yaxis_title="trainable parameters", xaxis_type="log", height=400)
st.plotly_chart(scatter, key="lx_search_scatter")

selection = st.dataframe(
    table,
    hide_index=True,
    key="lx_search_table",
    on_select="rerun",
    selection_mode="single-row",
    column_config={"percent": st.column_config.NumberColumn("% of model", format="%.4f")},
)
st.download_button(
    "Download CSV",
    table.to_csv(index=False).encode(),
    file_name=f"lora-search-{priority}-{state.spec.model_id.replace('/', '_')}.csv",
    mime="text/csv",
    key="lx_search_csv",
)
rows = selection.selection.rows if selection is not None else []
if rows:
    row = table.iloc[rows[0]]
    st.write(
        f"Selected configuration {int(row['config'])}: r={row['r']}, alpha={row['lora_alpha']:g}, targets {row['targets']}"
    )
    if st.button("Apply to the sidebar", key="lx_search_apply", type="primary"):
        chosen, _ = adapt_to_model(search_space(priority)[int(row["config"])], state.inventory)
        apply_settings(chosen, state.inventory)
st.caption(
    f"Grids: {', '.join(f'{k} {len(search_space(k))}' for k in SEARCH_SPACES)} configurations. "
    f"Counts by lora_core {lora_core.__version__}."
)
