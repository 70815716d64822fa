"""Tests never touch the network: Hub access is switched off before anything imports it."""

import os
from collections.abc import Iterator

import pytest

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


@pytest.fixture(scope="session", autouse=True)
def _app_run_managers() -> Iterator[list]:
    """Every run manager the app starts (pages/common/resources) during the session. The app
    caches one per data dir for the process, and each AppTest test has its own data dir, so
    without this each test's training worker idled (about 450 MB) until pytest ended: 30 of them,
    12.8 GB, were alive at once in one run of the suite."""
    from pages.common import resources

    started: list = []
    original = resources.RunManager

    class Recorded(original):  # type: ignore[valid-type, misc]
        def __init__(self, store) -> None:
            super().__init__(store)
            started.append(self)

    resources.RunManager = Recorded
    yield started
    resources.RunManager = original
    for manager in started:
        manager.shutdown()


@pytest.fixture(autouse=True)
def _stop_the_apps_workers(_app_run_managers: list) -> Iterator[None]:
    """After each test, stop the workers the app started in it and forget them, so a later test
    on the same data dir gets a fresh one."""
    yield
    if _app_run_managers:
        from pages.common import resources

        while _app_run_managers:
            _app_run_managers.pop().shutdown()
        resources._run_manager.clear()


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, object, int]]:
    """Every metrics read of the store while a test runs: (method, what was asked, rows returned),
    for the live views' tests, which bound what a poll reads."""
    from lora_core.store import Store

    calls: list[tuple[str, object, int]] = []
    for name in ("metrics", "metrics_since"):
        original = getattr(Store, name)

        def spy(self, *args, _name=name, _original=original):
            frame = _original(self, *args)
            calls.append((_name, args[0] if args else None, len(frame)))
            return frame

        monkeypatch.setattr(Store, name, spy)
    return calls
