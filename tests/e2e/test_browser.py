"""The whole app in a real browser: Debian's chromium driven by playwright against `streamlit run`.

Full-page screenshots of every page land in artifacts/screenshots/ (the README shows them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from browser import CHROMIUM, CHROMIUM_FLAGS, ROOT, streamlit_server, wait_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: `make test` installs Debian's chromium"
    ),
]
SHOTS = ROOT / "artifacts" / "screenshots"
PAGES = {"overview": "", "rank": "rank", "alpha": "alpha", "targets": "targets", "dropout": "dropout"}
PAGES |= {"search": "search", "memory": "memory", "finetune": "finetune", "export": "export", "inspect": "inspect"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("e2e-tiny") / "model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("e2e-data")
    with streamlit_server(env={"LORA_EXPLORER_DATA": str(data)}) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 2400}, accept_downloads=True)
    page = context.new_page()
    yield page
    context.close()


def metric(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']", has_text=label).first
    return box.locator("[data-testid='stMetricValue']").inner_text().strip()


def open_url(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    wait_idle(page, 120_000)


def test_rank_slider_changes_the_count_exactly(server, page) -> None:
    open_url(page, f"{server}/?model=facebook/opt-125m&targets=Q,V")
    assert metric(page, "Trainable parameters") == "589,824"  # r=16 q,v: the seed's OPT-125m figure
    slider = page.locator("[data-testid='stSidebar'] input[type='range']").first  # the Rank r slider
    thumb = page.locator("[data-testid='stSidebar'] [data-testid='stSliderThumbValue']").first
    for _ in range(8):  # one key press per rerun, 16 -> 8
        slider.focus()
        slider.press("ArrowLeft")
        wait_idle(page)
    assert thumb.inner_text().strip() == "8"
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stMetricValue]')].some(e => e.innerText.trim() === '294,912')",
        timeout=30_000,
    )
    assert metric(page, "Trainable parameters") == "294,912"  # r=8


def test_catalogue_model_pick(server, page) -> None:
    open_url(page, server)
    picker = page.locator("[data-testid='stSidebar'] [data-testid='stSelectbox'] input").first
    picker.click()
    page.keyboard.type("Llama-3.1-70B")
    page.wait_for_timeout(500)
    page.keyboard.press("Enter")
    wait_idle(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stMetricValue]')].some(e => e.innerText.trim() === '65,536,000')",
        timeout=60_000,
    )  # Llama-3.1-70B, r=16, all attention
    assert "Current: meta-llama/Llama-3.1-70B-Instruct" in page.inner_text("[data-testid='stSidebar']")


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_opens_without_an_exception_and_is_captured(server, page, name: str) -> None:
    open_url(page, f"{server}/{PAGES[name]}")
    page.wait_for_timeout(1500)  # let charts and tables paint
    wait_idle(page, 120_000)  # a page may rerun once (query-param sync) before it settles
    page.wait_for_timeout(1000)
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.locator("h1").first.inner_text().strip()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_strategies_are_compared_side_by_side(server, page) -> None:
    open_url(page, f"{server}/targets?model=meta-llama/Llama-2-7b-hf")
    # the page has two charts (strategies, then the layer heatmap); wait for the strategies one by
    # its content, as `.first` once caught the heatmap while the page was still settling
    chart = page.locator("[data-testid='stPlotlyChart']", has_text="All linear").first
    chart.wait_for(timeout=60_000)
    labels = chart.inner_text()
    for strategy in ("Q,V", "All attention", "FFN only", "All linear"):
        assert strategy in labels


def test_download_peft_json_loads_in_peft(server, page, tmp_path) -> None:
    from peft import LoraConfig

    open_url(page, f"{server}/?model=facebook/opt-125m&r=12&alpha=24&targets=Q,V")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download adapter_config.json").click()
    folder = tmp_path / "adapter"
    folder.mkdir()
    download.value.save_as(folder / "adapter_config.json")
    config = LoraConfig.from_pretrained(str(folder))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (12, 24, {"q_proj", "v_proj"})
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "facebook/opt-125m"


def test_shared_link_reopens_the_same_settings(server, page) -> None:
    open_url(page, f"{server}/?model=google-t5/t5-base&r=4&alpha=8&targets=All%20attention&dora=1")
    assert "Current: google-t5/t5-base" in page.inner_text("[data-testid='stSidebar']")
    expected = 4 * (768 + 768) * 4 * 36 + 768 * 4 * 36  # q,k,v,o in 36 attention blocks + DoRA magnitudes
    assert metric(page, "Trainable parameters") == f"{expected:,}"
    assert re.search(r"[?&]r=4(&|$)", page.url)


def test_bad_link_values_fall_back_with_a_notice(server, page) -> None:
    open_url(page, f"{server}/?model=nobody/nothing&r=9999&targets=Everything")
    assert page.locator("[data-testid='stException']").count() == 0
    notice = page.inner_text("[data-testid='stSidebar']")
    assert "could not be used" in notice and "r=9999" in notice
    assert metric(page, "Trainable parameters") == "16,777,216"  # the defaults: Llama-2-7b, r=16, all attention


def test_short_fine_tuning_run_draws_points(server, page, tiny_model) -> None:
    open_url(page, f"{server}/finetune")
    page.get_by_text("Hub id or local path", exact=True).click()
    page.get_by_label("Hub id or local folder (causal LM)").fill(str(tiny_model))
    steps = page.get_by_role("spinbutton", name="Steps")
    steps.fill("40")
    page.get_by_role("button", name="Start").click()
    wait_idle(page)
    page.wait_for_function(
        "() => document.body.innerText.includes('queued') || document.body.innerText.includes('Run 1')", timeout=30_000
    )
    # the fragment redraws every poll (pages/finetune.py POLL_SECONDS): wait until a drawn loss line has more than 3 points
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stPlotlyChart] .scatterlayer path.js-line')]"
        ".some(line => (line.getAttribute('d') || '').split('L').length > 4)",
        timeout=180_000,
    )
    page.wait_for_timeout(1000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "finetune-run.png"), full_page=True)


def test_a_deep_link_is_the_first_request_of_a_fresh_server(browser, tmp_path) -> None:
    """Streamlit dispatches the first run of a server with a pages/ folder to the page file alone
    (its legacy mode); the app hands over to app.py's navigation, so a shared link to a page still
    gets the app's sidebar, pages and settings from the link."""
    with streamlit_server(env={"LORA_EXPLORER_DATA": str(tmp_path / "data")}) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        open_url(page, f"{url}/memory?model=facebook/opt-125m&r=12")
        page.wait_for_timeout(1500)
        wait_idle(page, 120_000)
        nav = page.locator("[data-testid='stSidebarNav']").inner_text()
        assert "Search spaces" in nav and "Fine-tune" in nav and "common" not in nav  # app titles, not file names
        assert page.locator("h1").first.inner_text().strip() == "Memory"
        assert "Current: facebook/opt-125m" in page.inner_text("[data-testid='stSidebar']")
        page.close()


def test_an_experiment_of_two_trials_on_the_embedded_model_draws_both_curves_and_a_pareto_chart(server, page) -> None:
    open_url(page, f"{server}/experiments")
    ranks = page.locator("[data-testid='stMultiSelect']", has_text="Ranks r").locator("input")
    ranks.click()
    ranks.press("Backspace")  # drops r=16: Q,V and All linear at r=4, two trials
    page.keyboard.press("Escape")
    page.get_by_role("spinbutton", name="Steps").fill("2")
    page.get_by_role("spinbutton", name="Eval every").fill("2")  # evaluated before the first step and after the last
    length = page.locator("[data-testid='stSlider']", has_text="Sequence length").get_by_role("slider")
    length.focus()
    length.press("ArrowLeft")  # 128 -> 64 tokens
    page.get_by_role("button", name="Plan").click()
    wait_idle(page)
    assert metric(page, "Trials") == "2"
    page.get_by_role("button", name="Start").click()
    wait_idle(page)
    # the curves are coloured by the first varied dimension; both trials' train curves get drawn
    page.wait_for_function(
        "() => { const t = [...document.querySelectorAll('[data-testid=stPlotlyChart]')].map(c => c.innerText).join(' ');"
        " return t.includes('targets=Q,V') && t.includes('targets=All linear'); }",
        timeout=300_000,
    )
    # when the last trial ends the polling stops and the full page draws the results
    page.get_by_text("Pareto front").first.wait_for(timeout=300_000)
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert "2/2 trials done" in page.inner_text("[data-testid='stMain']")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "experiments.png"), full_page=True)


def test_the_advisor_follows_its_form_and_applies_to_the_sidebar(server, page) -> None:
    from lora_core.advisor import Case, advise

    open_url(page, f"{server}/advisor?model=meta-llama/Meta-Llama-3-8B")
    examples = page.get_by_role("spinbutton", name="Training examples")
    examples.fill("100000")
    examples.press("Enter")
    wait_idle(page)
    expected = advise(Case("meta-llama/Meta-Llama-3-8B", "sft", 100_000, 256.0, 0.0, 24.0, "quality"))
    assert metric(page, "Trainable parameters (exact)") == f"{expected.count.trainable_params:,}"
    assert metric(page, "On your 24 GiB GPU") == ("fits" if expected.fits else "does not fit")
    assert page.locator("[data-testid='stException']").count() == 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "advisor.png"), full_page=True)
    page.get_by_role("button", name="Apply to the sidebar").click()
    wait_idle(page)
    from playwright.sync_api import expect

    # Apply parks the values and reruns: the slider shows them once that second run has drawn
    thumb = page.locator("[data-testid='stSidebar'] [data-testid='stSliderThumbValue']").first
    expect(thumb).to_have_text(str(expected.settings.r), timeout=60_000)
    page.wait_for_function(f"() => /[?&]r={expected.settings.r}(&|$)/.test(location.search)", timeout=60_000)
