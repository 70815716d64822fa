"""One background worker per server process that trains queued runs one at a time.

The worker is a child interpreter (`python -m lora_core.runner`), started when the manager is
created and warmed by importing torch, transformers and peft, so:
- training runs on the child's main thread at full speed (on this 2-core CPU a training thread
  inside the Streamlit process ran ~20% slower, competing with the server's threads and OpenMP
  teams);
- an out-of-memory kill or a crash of a run takes down the child, not the server: the manager
  marks that run failed and starts a fresh worker;
- Trainer's process-global accelerate state never meets a second run at once.

Jobs go through the store: the child claims the oldest queued run atomically; cancellation is a
flag the training callback reads each step. Any process that shares the store can queue or
cancel, and the child exits when its parent is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from lora_core.settings import LoraSettings
from lora_core.store import WORKER, Store, process_alive, process_started
from lora_core.training import TrainConfig, preflight


class RunManager:
    """Queue of runs for one store; `submit` returns at once with the run id."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._closed = False
        self._start_worker()
        self._monitor = threading.Thread(target=self._watch, name="lora-explorer-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)

    def _start_worker(self) -> None:
        # A plain child interpreter (`python -m lora_core.runner`), not multiprocessing: under
        # `streamlit run` the parent's __main__ is the app script, which spawn would re-execute.
        self._ready_file = self.store.data_dir / f"worker-{os.getpid()}.ready"
        self._ready_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "lora_core.runner",
            str(self.store.data_dir),
            str(os.getpid()),
            str(self._ready_file),
        ]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 120) -> bool:
        """Block until the worker has its imports done (it then starts a run at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready_file.exists():
                return True
            time.sleep(0.1)
        return False

    def submit(self, config: TrainConfig, settings: LoraSettings, name: str | None = None) -> int:
        """Queue a run and return its id. Raises `InputError` (fields named) for anything `preflight`
        finds: bad settings or config, a missing device, an unreadable dataset, a model that is not
        a causal LM; nothing is queued then."""
        preflight(config, settings)
        label = name or f"r={settings.r} a={settings.lora_alpha:g} {describe(settings)} on {config.dataset}"
        return self.store.create_run(
            label, config.model, config.dataset, settings.to_peft_dict(), dataclasses.asdict(config), owner=WORKER
        )

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
            try:
                code = self._process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
            if self._closed:
                return
            for run_id in self.store.active_run_ids():
                run = self.store.run(run_id)
                if run and run["status"] == "running" and run.get("owner_pid") == self._process.pid:
                    reason = (
                        "the training process was killed (out of memory?)"
                        if code < 0
                        else f"the training process exited ({code})"
                    )
                    self.store.update_run(
                        run_id,
                        status="failed",
                        finished=time.time(),
                        error=f"{reason}: lower the batch size or sequence length",
                    )
            with self._lock:
                self._start_worker()

    def shutdown(self) -> None:
        """Stop the worker process (a run in flight is cancelled first). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for run_id in self.store.active_run_ids():
            self.store.request_cancel(run_id)
        self._process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10)
        if self._process.poll() is None:
            self._process.kill()


def worker_main(data_dir: str, parent_pid: int, ready_file: str) -> None:
    """The child: warm up the heavy imports, then train queued runs (oldest first, claimed
    atomically in the store) until the parent process is gone. The base model stays loaded while
    the next queued run trains the same one (an experiment's trials), and is dropped when the
    queue is empty, so an idle worker holds no model. A trial of a Ray experiment hands the whole
    experiment to a Ray Tune driver here."""
    import torch  # noqa: F401 - warm-up so the first run starts at once
    import transformers  # noqa: F401
    from peft import get_peft_model  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from lora_core.training import BaseModels, run_training

    store = Store.open(data_dir)
    Path(ready_file).write_text(str(os.getpid()))
    parent_started = process_started(parent_pid)  # so that a new process given the pid is not taken for it
    models = BaseModels()
    while process_alive(parent_pid, parent_started):
        run = store.claim_next(watcher_pid=parent_pid)
        if run is None:
            models.clear()
            time.sleep(0.2)
            continue
        experiment = store.experiment(run["experiment_id"]) if run.get("experiment_id") else None
        if experiment is not None and experiment["runner"] == "ray":
            models.clear()
            _drive_on_ray(store, experiment)
            continue
        config = TrainConfig(**run["config"])
        settings = LoraSettings.from_peft_dict(run["settings"])
        run_training(store, run["id"], config, settings, StoreCancel(store, run["id"]), base_models=models)
        following = store.next_queued()
        models.keep_only(following["model"] if following else None)


def _drive_on_ray(store: Store, experiment: dict) -> None:
    """Run a Ray experiment's trials through Ray Tune from this worker (the driver), at the
    address its spec names, with ASHA early stopping when its spec asks (an experiment stored
    before the page offered ASHA has no `asha`: off); a driver that cannot start fails the
    trials with the reason."""
    from lora_core.errors import one_line

    spec = experiment["spec"]
    try:
        from lora_core.experiments.ray_tune import run_on_ray

        run_on_ray(store, int(experiment["id"]), spec.get("ray_address") or "auto", asha=bool(spec.get("asha", False)))
    except Exception as error:  # a missing ray, an unreachable cluster: the trials say why
        reason = f"Ray: {one_line(error)}"
        for run_id in store.experiment_runs(int(experiment["id"]))["id"]:
            run = store.run(int(run_id))
            if run and run["status"] in ("queued", "running"):
                store.update_run(int(run_id), status="failed", error=reason, finished=time.time())


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


if __name__ == "__main__":
    worker_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
