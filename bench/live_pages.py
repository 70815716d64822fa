"""The pages bench_live measures, as a person uses them in a browser: how training starts from each
page, and how a new tab comes to watch it live.

The Fine-tune page starts one run (Start) and a tab watches it by picking it in "Overlay runs".
The Experiments page starts an experiment from its form (the trials train one after another in the
server's worker) and a tab watches it on its own: the newest experiment is the one shown, its live
curves polled every 2 s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_core.store import Store

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CURVE = "[data-testid=stPlotlyChart] .scatterlayer path.js-line"
# The experiment's grid: learning rates only, so every trial costs the same per step (the sidebar's
# default LoRA settings, as the Fine-tune page's run) and a window spanning two trials compares
# like with like; each trial draws its own curve.
LEARNING_RATES = ("2e-4", "5e-4", "1e-3", "2e-3")
EXPERIMENT_NAME = "bench live"


@dataclass(frozen=True)
class LivePage:
    """A page to measure: `start` begins training from it in a tab that then closes and returns
    the id a watching tab follows (a run's or an experiment's), `runs` the runs that id trains in
    the order they train, and `watch` opens a tab watching it, loaded and drawn, and returns that
    tab's browser context. `start` gets the steps the measurement needs in all."""

    name: str  # as the output labels it
    file: str  # the page's source, for --compare
    start: Callable[[Browser, str, int], int]
    runs: Callable[[Store, int], list[int]]
    watch: Callable[[Browser, str, int], BrowserContext]
    what: Callable[[int], str]  # what trains, for the setup line, given the steps needed
    history_experiments: int  # finished experiments among the store's finished runs: the page lists them


def open_page(browser, url: str, path: str):
    """A new tab (its own session) on the page at `path`, loaded; returns (context, page)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    page.goto(f"{url}/{path}", wait_until="domcontentloaded", timeout=180_000)
    page.wait_for_selector(IDLE, timeout=180_000)
    return context, page


def queued_id(page, pattern: str) -> int:
    """The id in the page's "<pattern> N queued" message, once it shows."""
    page.wait_for_function(f"() => /{pattern} \\d+ queued/.test(document.body.innerText)", timeout=120_000)
    return int(re.search(rf"{pattern} (\d+) queued", page.inner_text("body"))[1])


def start_run(browser, url: str, steps_needed: int) -> int:
    """Press Start on the Fine-tune page with the bench's settings, then close the tab; the run id.
    The run is longer than any measurement needs; it is cancelled once measured."""
    context, page = open_page(browser, url, "finetune")
    page.get_by_role("spinbutton", name="Steps").fill("2000")
    page.get_by_role("spinbutton", name="Eval every").fill("500")  # no evaluation pause in the windows
    page.get_by_role("button", name="Start").click()
    run_id = queued_id(page, "Run")
    context.close()
    return run_id


def watch_run(browser, url: str, run_id: int):
    """A new tab on the Fine-tune page with the run's loss curve drawn; returns its context."""
    context, page = open_page(browser, url, "finetune")
    picker = page.locator("[data-testid=stMultiSelect]", has_text="Overlay runs")
    picker.locator("input").fill(f"{run_id}: ")
    picker.locator("input").press("Enter")
    page.keyboard.press("Escape")
    page.wait_for_selector(CURVE, timeout=60_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    return context


def trial_steps(steps_needed: int) -> int:
    """Steps per trial so that the experiment's trials together outlast the measurement."""
    return math.ceil(steps_needed / len(LEARNING_RATES))


def multiselect(page, label: str, values: tuple[str, ...]) -> None:
    """Set the form's multiselect `label` to `values` (none: the sidebar's value)."""
    field = page.locator("[data-testid=stMultiSelect]", has_text=label).locator("input")
    field.click()
    for _ in range(len(LEARNING_RATES)):  # more than any default holds; Backspace on none does nothing
        field.press("Backspace")
    for value in values:
        field.fill(value)
        field.press("Enter")
    page.keyboard.press("Escape")


def start_experiment(browser, url: str, steps_needed: int) -> int:
    """Start an experiment of one trial per learning rate from the Experiments page's form, then
    close the tab; the experiment id. Raises RuntimeError if the page queued another number of trials."""
    context, page = open_page(browser, url, "experiments")
    for label in ("Target strategies", "Ranks r", "Alphas"):
        multiselect(page, label, ())
    multiselect(page, "Learning rates", LEARNING_RATES)
    page.get_by_role("spinbutton", name="Steps").fill(str(trial_steps(steps_needed)))
    page.get_by_role("spinbutton", name="Eval every").fill("500")  # evaluated after a trial's first and last steps
    page.get_by_role("textbox", name="Experiment name (optional)").fill(EXPERIMENT_NAME)
    page.get_by_role("button", name="Start").click()
    experiment_id = queued_id(page, "Experiment")
    queued = re.search(r"queued: (\d+) trials", page.inner_text("body"))
    context.close()
    if queued is None or int(queued[1]) != len(LEARNING_RATES):
        raise RuntimeError(f"the Experiments page queued {queued and queued[1]} trials, not {len(LEARNING_RATES)}")
    return experiment_id


def watch_experiment(browser, url: str, experiment_id: int):
    """A new tab on the Experiments page showing the experiment's live curves; returns its context.
    Raises RuntimeError if the page shows another experiment."""
    context, page = open_page(browser, url, "experiments")
    shown = page.get_by_role("combobox", name="Experiment", exact=True).input_value()
    if shown != f"{experiment_id}: {EXPERIMENT_NAME}":
        raise RuntimeError(f"the Experiments page shows {shown!r}, not experiment {experiment_id}")
    page.wait_for_selector(CURVE, timeout=60_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    return context


def experiment_runs(store: Store, experiment_id: int) -> list[int]:
    return store.experiment_runs(experiment_id)["id"].tolist()


PAGES = {
    "finetune": LivePage(
        "page",
        "pages/finetune.py",
        start_run,
        lambda store, run_id: [run_id],
        watch_run,
        lambda steps_needed: "in one run",
        0,
    ),
    "experiments": LivePage(
        "Experiments page",
        "pages/experiments.py",
        start_experiment,
        experiment_runs,
        watch_experiment,
        lambda steps_needed: (
            f"in one experiment of {len(LEARNING_RATES)} trials of {trial_steps(steps_needed)} steps (learning rates"
            f" {', '.join(LEARNING_RATES)}) started from the Experiments page's form and trained one after another"
            " by the server's worker"
        ),
        300,
    ),
}
