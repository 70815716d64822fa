"""What a page file calls first: the shared state and sidebar, however the page was reached."""

from __future__ import annotations

import streamlit as st

from pages.common.sidebar import render_sidebar
from pages.common.state import Current, current, init_state


def page_state() -> Current:
    """`current()` for a page file. The first run in a fresh server can reach a page file directly
    (Streamlit's legacy pages/ folder dispatch, before app.py's `st.navigation` has run once, e.g.
    a shared link to /memory): that run hands over to app.py, whose navigation then serves the same
    URL; should the hand-over not happen, the page sets up the shared state and sidebar itself."""
    if "lx_spec" not in st.session_state:
        from streamlit.runtime.pages_manager import PagesManager

        if PagesManager.uses_pages_directory:
            # What `st.navigation` sets once it runs: every run after this one executes app.py
            PagesManager.uses_pages_directory = False
            st.rerun()
        init_state()
        render_sidebar()
    return current()
