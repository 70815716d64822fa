"""LoRA Explorer: the Streamlit entry point.

Registers the pages with `st.navigation`, renders the shared sidebar (model + LoRA settings) that
every page reads from `st.session_state`, then runs the chosen page.
"""

from __future__ import annotations

import streamlit as st

from pages.common import init_state, render_sidebar

st.set_page_config(page_title="LoRA Explorer", page_icon="🎛️", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon="🏠", default=True),
]

init_state()
render_sidebar()
navigation = st.navigation(PAGES)
navigation.run()
