"""One background worker per process that trains queued runs one at a time.

Trainer (through accelerate) keeps process-global state, so runs never overlap in a process. The
Streamlit script thread only submits, cancels and reads the store; it never trains.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

from lora_core.settings import LoraSettings
from lora_core.store import Store
from lora_core.training import TrainConfig, run_training


class RunManager:
    """Queue of runs for one store; `submit` returns at once with the run id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[int, TrainConfig, LoraSettings] | None] = queue.Queue()
        self._cancels: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.current: int | None = None
        self._worker = threading.Thread(target=self._work, name="lora-explorer-trainer", daemon=True)
        self._worker.start()

    def submit(self, config: TrainConfig, settings: LoraSettings, name: str | None = None) -> int:
        """Queue a run and return its id. Raises ValueError (fields named) for bad settings or config."""
        problems = config.problems() + settings.problems()
        if problems:
            raise ValueError("; ".join(problems))
        label = name or f"r={settings.r} a={settings.lora_alpha:g} {describe(settings)} on {config.dataset}"
        run_id = self.store.create_run(
            label, config.model, config.dataset, settings.to_peft_dict(), dataclasses.asdict(config)
        )
        with self._lock:
            self._cancels[run_id] = threading.Event()
        self._queue.put((run_id, config, settings))
        return run_id

    def cancel(self, run_id: int) -> None:
        """Stop a run after its current step, or drop it from the queue."""
        with self._lock:
            event = self._cancels.get(run_id)
        if event is not None:
            event.set()
        run = self.store.run(run_id)
        if run is not None and run["status"] == "queued":
            self.store.update_run(run_id, status="cancelled", finished=time.time(), error="cancelled before it started")

    def wait(self, run_id: int, timeout: float = 600) -> dict:
        """Block until `run_id` finishes (for the CLI and tests); returns the run row."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.store.run(run_id)
            if run is not None and run["status"] not in ("queued", "running"):
                return run
            time.sleep(0.1)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            run_id, config, settings = item
            with self._lock:
                cancel = self._cancels[run_id]
            if cancel.is_set():
                continue
            self.current = run_id
            try:
                run_training(self.store, run_id, config, settings, cancel)
            finally:
                self.current = None
                with self._lock:
                    self._cancels.pop(run_id, None)

    def shutdown(self) -> None:
        self._queue.put(None)


def describe(settings: LoraSettings) -> str:
    targets = settings.target_modules
    if isinstance(targets, tuple):
        return "+".join(t.removesuffix("_proj") for t in targets) if len(targets) <= 4 else f"{len(targets)} targets"
    return str(targets) if targets else "default targets"
