"""Tests never touch the network: Hub access is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _v2_navigation_only() -> None:
    """AppTest resets `PagesManager.uses_pages_directory` before every run, so with a `pages/`
    folder beside app.py each rerun takes the legacy v1 path and executes the page file alone,
    without app.py's sidebar. The real server sets the flag to False for good once `st.navigation`
    runs; pin it there so AppTest reruns behave like the server."""
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    PagesManager.__init__ = init


_v2_navigation_only()
