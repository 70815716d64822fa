"""LoRA Explorer: the Streamlit entry point.

Registers the pages with `st.navigation`, renders the shared sidebar (model + LoRA settings) that
every page reads from `st.session_state`, then runs the chosen page.
"""

from __future__ import annotations

import gc

import streamlit as st

from pages.common import init_state, render_sidebar, run_manager

st.set_page_config(page_title="LoRA Explorer", page_icon=":material/tune:", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("pages/rank.py", title="Rank", icon=":material/show_chart:"),
    st.Page("pages/alpha.py", title="Alpha", icon=":material/tune:"),
    st.Page("pages/targets.py", title="Target modules", icon=":material/target:"),
    st.Page("pages/dropout.py", title="Dropout", icon=":material/casino:"),
    st.Page("pages/search.py", title="Search spaces", icon=":material/explore:"),
    st.Page("pages/memory.py", title="Memory", icon=":material/memory:"),
    st.Page("pages/finetune.py", title="Fine-tune", icon=":material/model_training:"),
    st.Page("pages/experiments.py", title="Experiments", icon=":material/science:"),
    st.Page("pages/advisor.py", title="Advisor", icon=":material/lightbulb:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/troubleshoot:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]


@st.cache_resource(show_spinner=False)
def freeze_startup_heap() -> None:
    """Once per server, after the first page has imported torch, transformers, PEFT and plotly:
    move those millions of long-lived objects out of the garbage collector's reach. Otherwise
    every full collection walks them all, and a rerun that triggers one takes ~200 ms longer
    (measured in bench/bench_rerun.py)."""
    gc.collect()
    gc.freeze()


init_state()
run_manager()  # starts the training worker with the server, so its imports are done before Start
navigation = st.navigation(PAGES)
render_sidebar()
try:
    navigation.run()
finally:
    freeze_startup_heap()
