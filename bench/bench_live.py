"""Watching training costs nothing: the Streamlit server's CPU while a real browser watches it live,
and the training speed with the browser watching against without one. `--page finetune` (the
default) watches a run on the Fine-tune page; `--page experiments` watches an experiment's trials
on the Experiments page, whose live view polls every 2 s (a sweep streams many runs at once).

Goals (issue 13): the server's CPU while a browser watches is at most 5% of one core; training runs
at >= 0.9x the tokens/s it trains at with no browser attached.

Training starts the way a person starts it, in Debian's chromium (driven by the PyPI playwright
package) on a fresh `streamlit run app.py` with its own LORA_EXPLORER_DATA: Start on the Fine-tune
page, or the Experiments page's form (one trial per learning rate, trained one after another by the
server's worker); that tab then closes. Windows of a few training steps follow within that one run
or experiment: no browser at all, then a new tab watching (the Fine-tune page with the run picked
in "Overlay runs", its loss curve drawn and growing; or the Experiments page showing the
experiment's live curves), then none again, and so on. Other people's processes on this 2-core VM
swing training speed by 2x or more over minutes, so each watched window is compared with the
unwatched windows on either side of it; two separate runs, one watched and one not, measured mostly
the neighbours. A watched window starts once its tab has loaded and settled: opening the page is
not watching. The server's CPU is its own process's (user + system; the training worker is its
child and is not counted); tokens/s come from the store's own clock (cumulative tokens and elapsed
seconds of the runs' train points at each window's edges, counted from each run's second step:
before it a run sets up, and an experiment's next trial does so inside a window).

Run: `.venv/bin/python -m bench.bench_live [--page experiments] [--pairs 4] [--steps 10] [--compare REV]`
(embedded SmolLM2-135M-Instruct, json_extraction, batch 4 x 128 tokens, the sidebar's default LoRA
settings). The store already holds 2,000 finished runs (for the Experiments page, 1,200 of them the
trials of 300 finished experiments). With `--compare REV` the same measurement also runs against
the page as it was at git revision REV (the rest of the app as it is now).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.live_pages import LEARNING_RATES, PAGES, LivePage
from lora_core.store import ACTIVE, Store
from lora_core.training import EMBEDDED
from tests.e2e.browser import CHROMIUM, CHROMIUM_FLAGS, served_app

ROOT = Path(__file__).resolve().parents[1]
CPU_GOAL, RATE_GOAL = 0.05, 0.9
HISTORY_POINTS = 60
SETTLE = 3.0  # seconds after a tab opens or closes before a window starts
# A run's first steps set it up: loading, the first step, and the base model's evaluation after it.
SETUP_STEPS = 2
# Steps that may train unmeasured while a tab opens, settles, closes and settles again.
BETWEEN_STEPS = 10


@dataclass(frozen=True)
class Window:
    """One stretch of training, with or without a browser watching."""

    watched: bool
    tokens: float  # trained in the window, by the store's clock
    train_seconds: float  # the store's elapsed seconds over those steps
    wall: float
    server_cpu: float  # CPU seconds of the server process in the window
    browser_cpu: float  # CPU seconds of chromium's processes in the window
    trials: tuple[int, ...] = ()  # of an experiment: which trials (from 1) trained in the window

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds


def file_watcher(app_dir: Path) -> str:
    """Streamlit's file watcher setting as `streamlit run` in `app_dir` reads it. The watcher follows
    the app's folder tree (here with .venv in it) for as long as a session is open, and its cost is
    the server's."""
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "streamlit"), "config", "show"], cwd=app_dir, capture_output=True, text=True
    ).stdout
    match = re.search(r'^(#? ?)fileWatcherType = "(\w+)"', shown, re.MULTILINE)
    return "unknown" if match is None else match[2] + (" (Streamlit's default)" if match[1] else "")


@contextlib.contextmanager
def server(app_dir: Path, data_dir: Path) -> Iterator[tuple[str, psutil.Process]]:
    """The app in `app_dir` served on a free port; yields (URL, the server process) once healthy."""
    with served_app(app_dir, {"LORA_EXPLORER_DATA": str(data_dir)}, name="bench-live-streamlit") as (url, process):
        yield url, psutil.Process(process.pid)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU of these processes themselves (children excluded); gone ones count 0."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def chromium_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name().lower()]


def train_points(store: Store, run_ids: list[int]) -> dict[int, tuple[int, float, float]]:
    """Each run's (step, tokens, seconds) at its newest train point, (0, 0, 0) before one. Tokens
    and seconds count from its SETUP_STEPS-th step on, so a window in which an experiment's next
    trial starts counts that trial's training, not its setting up."""
    points = dict.fromkeys(run_ids, (0, 0.0, 0.0))
    for run_id, rows in store.metrics(run_ids).query("kind == 'train'").groupby("run_id"):
        newest = rows.iloc[-1]
        origin = rows[rows["step"] >= SETUP_STEPS].iloc[0] if newest["step"] >= SETUP_STEPS else newest
        tokens, seconds = newest["tokens"] - origin["tokens"], newest["elapsed"] - origin["elapsed"]
        points[int(run_id)] = (int(newest["step"]), float(tokens), float(seconds))
    return points


def steps_done(points: dict[int, tuple[int, float, float]]) -> int:
    return sum(step for step, _, _ in points.values())


def window(store: Store, run_ids: list[int], server_process: psutil.Process, steps: int, watched: bool) -> Window:
    """The next `steps` training steps of the runs (one after another), with the server's (and
    chromium's) CPU over them. Raises SystemExit if the runs end first."""
    browsers = chromium_processes() if watched else []
    start = train_points(store, run_ids)
    start_wall, start_server, start_browser = time.monotonic(), cpu_seconds([server_process]), cpu_seconds(browsers)
    goal = steps_done(start) + steps
    while steps_done(end := train_points(store, run_ids)) < goal:
        runs = store.runs(run_ids)
        if not runs["status"].isin(ACTIVE).any():
            raise SystemExit(f"runs {run_ids} ended before the windows did: {runs['error'].dropna().tolist()}")
        time.sleep(0.5)
    wall = time.monotonic() - start_wall
    server_cpu, browser_cpu = cpu_seconds([server_process]) - start_server, cpu_seconds(browsers) - start_browser
    tokens = sum(end[run_id][1] - start[run_id][1] for run_id in run_ids)
    seconds = sum(end[run_id][2] - start[run_id][2] for run_id in run_ids)
    trained = tuple(i + 1 for i, run_id in enumerate(run_ids) if end[run_id][0] > start[run_id][0])
    return Window(watched, tokens, seconds, wall, server_cpu, browser_cpu, trained if len(run_ids) > 1 else ())


def steps_needed(pairs: int, steps: int) -> int:
    """Training steps a measurement of `pairs` watched windows of `steps` steps lasts, at most."""
    return SETUP_STEPS + steps * (2 * pairs + 1) + BETWEEN_STEPS * 2 * pairs


def stop(store: Store, run_ids: list[int]) -> None:
    """Cancel the runs and wait until none is active. The last queued go first, so the worker
    claims none of them once the one training stops."""
    for run_id in reversed(run_ids):
        store.request_cancel(run_id)
    while store.runs(run_ids)["status"].isin(ACTIVE).any():
        time.sleep(0.5)


def measure(app_dir: Path, browser, page: LivePage, pairs: int, steps: int, history: int) -> list[Window]:
    """Windows of `steps` training steps, started from `page` on a fresh server whose store holds
    `history` finished runs: without a browser, with one watching, and so on, starting and ending
    without one."""
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        store = Store.open(data_dir)
        fill_history(store, history, HISTORY_POINTS, page.history_experiments)
        with server(app_dir, data_dir) as (url, server_process):
            watched_id = page.start(browser, url, steps_needed(pairs, steps))
            run_ids = page.runs(store, watched_id)
            window(store, run_ids, server_process, SETUP_STEPS, watched=False)  # loading the model, the first steps
            windows = [window(store, run_ids, server_process, steps, watched=False)]
            for _ in range(pairs):
                context = page.watch(browser, url, watched_id)
                time.sleep(SETTLE)  # the page's first full run is opening it, not watching
                windows.append(window(store, run_ids, server_process, steps, watched=True))
                context.close()
                time.sleep(SETTLE)
                windows.append(window(store, run_ids, server_process, steps, watched=False))
            stop(store, run_ids)
    return windows


def app_copy(folder: Path, rev: str | None, page_file: str) -> Path:
    """A copy of the app outside the checkout (app.py, pages/, .streamlit/), with `page_file` at
    git revision `rev` (None: as it is now)."""
    for name in ("app.py", "pages", ".streamlit"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    if rev is not None:
        page = subprocess.run(["git", "show", f"{rev}:{page_file}"], cwd=ROOT, capture_output=True, check=True)
        (folder / page_file).write_bytes(page.stdout)
    return folder


def fill_history(store: Store, runs: int, points: int, experiments: int = 0) -> None:
    """`runs` finished runs of `points` train points each in a new store, written in one
    transaction: the store of someone who has tried things for a while, which a poll must not read.
    The first of them are the trials of `experiments` finished experiments, one per learning rate."""
    rows = [
        (
            f"history {experiment} #{index + 1}: lr={lr}",
            experiment,
            json.dumps({"index": index, "values": {"lr": float(lr)}}),
        )
        for experiment in range(1, experiments + 1)
        for index, lr in enumerate(LEARNING_RATES)
    ][:runs]
    rows += [(f"history {i}", None, None) for i in range(len(rows), runs)]
    config, now = json.dumps({"steps": points}), time.time()
    spec = json.dumps({"grid": {"lr": [float(lr) for lr in LEARNING_RATES]}, "seeds": 1, "dimensions": ["lr"]})
    with contextlib.closing(sqlite3.connect(store.path)) as db, db:
        db.executemany(
            "INSERT INTO experiments (id, name, model, dataset, spec, created) VALUES (?, ?, ?, ?, ?, ?)",
            [(i, f"history {i}", EMBEDDED, "json_extraction", spec, now) for i in range(1, experiments + 1)],
        )
        db.executemany(
            "INSERT INTO runs (name, status, model, dataset, settings, config, created, experiment_id, trial)"
            " VALUES (?, 'completed', ?, 'json_extraction', '{}', ?, ?, ?, ?)",
            [(name, EMBEDDED, config, now, experiment, trial) for name, experiment, trial in rows],
        )
        ids = [row[0] for row in db.execute("SELECT id FROM runs")]
        db.executemany(
            "INSERT INTO metrics (run_id, kind, step, loss, tokens, tokens_per_s, elapsed) VALUES (?, 'train', ?, ?, ?, ?, ?)",
            [
                (run_id, step, 2.0 / step, 400 * step, 300.0, 1.3 * step)
                for run_id in ids
                for step in range(1, points + 1)
            ],
        )


def report(label: str, windows: list[Window]) -> None:
    """Each window, then the verdicts: the server's CPU over all watched windows, and each watched
    window's tokens/s against the mean of the unwatched windows on either side (which cancels a
    drift of the VM's speed), summarised by their median."""
    for w in windows:
        print(
            f"{label}: {'watched  ' if w.watched else 'unwatched'} {w.tokens_per_s:6.1f} tokens/s,"
            f" server CPU {w.server_cpu / w.wall:5.1%} of a core"
            + (f", chromium {w.browser_cpu / w.wall:.1%}" if w.watched else "")
            + (f", trial {'+'.join(map(str, w.trials))}" if w.trials else "")
        )
    watched = [w for w in windows if w.watched]
    unwatched = [w for w in windows if not w.watched]
    cpu = sum(w.server_cpu for w in watched) / sum(w.wall for w in watched)
    idle = sum(w.server_cpu for w in unwatched) / sum(w.wall for w in unwatched)
    ratios = [
        w.tokens_per_s / ((before.tokens_per_s + after.tokens_per_s) / 2)
        for before, w, after in zip(unwatched, watched, unwatched[1:])
    ]
    ratio = statistics.median(ratios)
    print(
        f"{label}: server CPU while a browser watches: {cpu:.1%} of one core, with no browser {idle:.1%}"
        f" (goal <= {CPU_GOAL:.0%}: {'met' if cpu <= CPU_GOAL else 'NOT met'})"
    )
    print(
        f"{label}: tokens/s watched / unwatched (each watched window against its two neighbours):"
        f" median {ratio:.2f}x of {', '.join(f'{r:.2f}x' for r in ratios)}"
        f" (goal >= {RATE_GOAL}x: {'met' if ratio >= RATE_GOAL else 'NOT met'})"
    )


def history_line(runs: int, experiments: int) -> str:
    line = f"the store holds {runs:,} finished runs of {HISTORY_POINTS} points besides the measured one"
    if not experiments:
        return line
    trials = min(experiments * len(LEARNING_RATES), runs)
    return f"{line}s, {trials:,} of them the trials of {experiments:,} finished experiments"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--page", choices=list(PAGES), default="finetune",
        help="watch a run on the Fine-tune page, or an experiment's trials on the Experiments page",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=4, help="watched windows, each between two unwatched ones")
    parser.add_argument("--steps", type=int, default=10, help="training steps per window")
    parser.add_argument("--history", type=int, default=2000, help="finished runs already in the store")
    parser.add_argument(
        "--compare",
        metavar="REV",
        help="measure this page and the same page of git revision REV, both from copies of the app outside the checkout",
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from lora_core.embedded import ensure_embedded

    page = PAGES[args.page]
    ensure_embedded()  # a warm model cache
    print(
        f"setup: embedded SmolLM2-135M-Instruct, json_extraction, batch 4 x 128 tokens, CPU;"
        f" {page.what(steps_needed(args.pairs, args.steps))}, {args.pairs} windows of {args.steps} steps"
        " with a browser watching, each between two without"
    )
    print(f"the server's file watcher: {file_watcher(ROOT)}")
    print(history_line(args.history, page.history_experiments))
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        if args.compare is None:
            report(f"this {page.name}", measure(ROOT, browser, page, args.pairs, args.steps, args.history))
        else:
            # Both from copies: the file watcher's cost depends on the folder tree the app is served from.
            versions = ((f"this {page.name} (copy)", None), (f"{page.name} at {args.compare} (copy)", args.compare))
            for label, rev in versions:
                with tempfile.TemporaryDirectory() as folder:
                    app = app_copy(Path(folder), rev, page.file)
                    report(label, measure(app, browser, page, args.pairs, args.steps, args.history))
        browser.close()
    print(f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
