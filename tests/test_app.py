"""AppTest: the app starts, shows a parameter count, and the count follows the sidebar."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 120


@pytest.fixture
def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_overview_shows_the_exact_count(app: AppTest) -> None:
    # Default: Llama-2-7b, r=16, All attention -> 16,777,216 (shared/model-configs README).
    assert metric(app, "Trainable parameters") == "16,777,216"


def test_rank_slider_changes_the_count(app: AppTest) -> None:
    app.slider(key="lx_r").set_value(8).run()
    assert metric(app, "Trainable parameters") == "8,388,608"


def test_model_switch_and_strategy(app: AppTest) -> None:
    app.selectbox(key="lx_catalogue_choice").set_value("facebook/opt-125m").run()
    app.selectbox(key="lx_strategy").set_value("Q,V").run()
    assert metric(app, "Trainable parameters") == "589,824"


def test_bad_custom_target_shows_one_error_and_keeps_the_model(app: AppTest) -> None:
    app.selectbox(key="lx_strategy").set_value("Custom").run()
    app.text_input(key="lx_custom_targets").set_value("not_a_module").run()
    assert not app.exception
    assert any("matches no module" in e.value for e in app.error)
    assert "meta-llama/Llama-2-7b-hf" in app.sidebar.caption[-1].value


def test_unknown_hub_id_keeps_the_current_model(app: AppTest) -> None:
    app.radio(key="lx_source").set_value("Hub id or path").run()
    app.text_input(key="lx_model_text").set_value("nobody/no-such-model").run()
    app.button(key="lx_load").click().run()
    assert not app.exception
    assert any("keeping meta-llama/Llama-2-7b-hf" in e.value for e in app.error)
    assert metric(app, "Trainable parameters") == "16,777,216"
