"""One background worker per server process that trains queued runs one at a time.

The worker is a spawned child process, started when the manager is created and warmed by
importing torch, transformers and peft, so:
- training runs on the child's main thread at full speed (on this 2-core CPU a training thread
  inside the Streamlit process ran ~20% slower, competing with the server's threads and OpenMP
  teams);
- an out-of-memory kill or a crash of a run takes down the child, not the server: the manager
  marks that run failed and starts a fresh worker;
- Trainer's process-global accelerate state never meets a second run at once.

Jobs go to the child through a queue; cancellation goes through the store (a flag the training
callback reads each step), so it works for any process that shares the store.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import multiprocessing as mp
import threading
import time

from lora_core.settings import LoraSettings
from lora_core.store import Store
from lora_core.training import TrainConfig


class RunManager:
    """Queue of runs for one store; `submit` returns at once with the run id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._context = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self._start_worker()
        self._monitor = threading.Thread(target=self._watch, name="lora-explorer-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)

    def _start_worker(self) -> None:
        self._jobs = self._context.Queue()
        self._ready = self._context.Event()
        self._process = self._context.Process(
            target=_worker_main,
            args=(str(self.store.data_dir), self._jobs, self._ready),
            name="lora-explorer-trainer",
            daemon=True,
        )
        self._process.start()

    def wait_ready(self, timeout: float = 120) -> bool:
        """Block until the worker has its imports done (it then starts a run at once)."""
        return self._ready.wait(timeout)

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
            self._jobs.put((run_id, dataclasses.asdict(config), settings.to_peft_dict()))
        return run_id

    def cancel(self, run_id: int) -> None:
        """Stop a run after its current step, or drop it from the queue."""
        self.store.request_cancel(run_id)

    def wait(self, run_id: int, timeout: float = 600) -> dict:
        """Block until `run_id` finishes (for the CLI, benchmarks and tests); returns the run row."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.store.run(run_id)
            if run is not None and run["status"] not in ("queued", "running"):
                return run
            time.sleep(0.1)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")

    def _watch(self) -> None:
        """Restart a worker that died, failing the run it was training."""
        while not self._closed:
            self._process.join(timeout=1.0)
            if self._closed or self._process.is_alive():
                continue
            code = self._process.exitcode
            for run_id in self.store.active_run_ids():
                run = self.store.run(run_id)
                if run and run["status"] == "running":
                    reason = (
                        "the training process was killed (out of memory?)"
                        if code and code < 0
                        else f"the training process exited ({code})"
                    )
                    self.store.update_run(
                        run_id,
                        status="failed",
                        error=f"{reason}: lower the batch size or sequence length",
                        finished=time.time(),
                    )
            with self._lock:
                queued = self._drain()
                self._start_worker()
                for job in queued:
                    self._jobs.put(job)

    def _drain(self) -> list:
        jobs = []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except Exception:
                return jobs

    def shutdown(self) -> None:
        """Stop the worker process (a run in flight is cancelled first). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for run_id in self.store.active_run_ids():
            self.store.request_cancel(run_id)
        with contextlib.suppress(OSError, ValueError):  # the queue may already be closed at exit
            self._jobs.put(None)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()


def _worker_main(data_dir: str, jobs, ready) -> None:
    """The child: warm up the heavy imports, then train jobs until told to stop."""
    import torch  # noqa: F401 - warm-up so the first run starts at once
    import transformers  # noqa: F401
    from peft import get_peft_model  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from lora_core.training import run_training

    store = Store.open(data_dir)
    ready.set()
    while True:
        job = jobs.get()
        if job is None:
            return
        run_id, config, settings = job
        run = store.run(run_id)
        if run is None or run["status"] != "queued":
            continue  # cancelled or deleted while queued
        run_training(
            store, run_id, TrainConfig(**config), LoraSettings.from_peft_dict(settings), StoreCancel(store, run_id)
        )


class StoreCancel:
    """A cancel flag read from the store (one small query per training step), usable across processes."""

    def __init__(self, store: Store, run_id: int, every: float = 0.0) -> None:
        self.store, self.run_id, self.every = store, run_id, every
        self._checked, self._set = 0.0, False

    def is_set(self) -> bool:
        if not self._set and time.monotonic() - self._checked >= self.every:
            self._checked = time.monotonic()
            self._set = self.store.cancel_requested(self.run_id)
        return self._set

    def set(self) -> None:
        self.store.request_cancel(self.run_id)
        self._set = True


def describe(settings: LoraSettings) -> str:
    targets = settings.target_modules
    if isinstance(targets, tuple):
        return "+".join(t.removesuffix("_proj") for t in targets) if len(targets) <= 4 else f"{len(targets)} targets"
    return str(targets) if targets else "default targets"
