"""What a training run writes through (`RunWriter`), and a store that records nothing (`NullStore`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from lora_core.store.core import Store
from lora_core.store.rows import empty_frame, no_new_metrics
from lora_core.store.status import WORKER


class RunWriter(Protocol):
    """What a training run writes through: `Store`, `NullStore`, or a stand-in that forwards a
    run's writes elsewhere (a Ray trial sends them to its driver)."""

    @property
    def data_dir(self) -> Path: ...

    def update_run(self, run_id: int, **fields: Any) -> None: ...

    def add_metric(self, run_id: int, kind: str, step: int, **values: float | int | None) -> None: ...

    def adapter_dir(self, run_id: int) -> Path: ...

    def scratch_dir(self, run_id: int) -> Path: ...


class NullStore:
    """A store that records nothing: what non-zero ranks of a multi-GPU `accelerate launch` get, so
    only rank 0 writes the run. Every public method of Store is here and answers as an empty store
    would, so code written against Store runs unchanged (the CLI's progress bar reads
    `metrics()["kind"]`); a method Store gains must be added here too (tests/test_store.py checks)."""

    data_dir = Path("/nonexistent")

    @classmethod
    def open(cls, data_dir: str | Path | None = None) -> NullStore:
        return cls()

    # Paths derive from `data_dir` alone: Store's own definitions serve.
    path = Store.path
    adapter_dir = Store.adapter_dir

    def scratch_dir(self, run_id: int) -> Path:
        """A real, new folder in the system temp dir: training on this rank still writes scratch files."""
        return Path(tempfile.mkdtemp(prefix=f"lora-explorer-run-{run_id}-{os.getpid()}-"))

    def clean_scratch(self) -> int:
        return 0

    def create_run(
        self,
        name: str,
        model: str,
        dataset: str,
        settings: dict,
        config: dict,
        owner: str = WORKER,
        experiment_id: int | None = None,
        trial: dict | None = None,
    ) -> int:
        return 0

    def create_experiment(
        self, name: str, model: str, dataset: str, spec: dict, runner: str = "local", trials: Sequence[dict] = ()
    ) -> int:
        return 0

    def experiment(self, experiment_id: int) -> dict | None:
        return None

    def experiments(self, experiment_ids: Iterable[int] | None = None) -> pd.DataFrame:
        return pd.DataFrame(columns=["id", "name", "model", "dataset", "spec", "runner", "created", "status", "trials"])

    def experiment_runs(self, experiment_id: int) -> pd.DataFrame:
        return empty_frame("runs")

    def cancel_experiment(self, experiment_id: int) -> None:
        return None

    def experiment_cancel_requested(self, experiment_id: int) -> bool:
        return False

    def delete_experiment(self, experiment_id: int) -> None:
        return None

    def take_experiment_runs(self, experiment_id: int) -> list[int]:
        return []

    def update_run(self, run_id: int, **fields: Any) -> None:
        return None

    def add_metric(self, run_id: int, kind: str, step: int, **values: float | int | None) -> None:
        return None

    def run(self, run_id: int) -> dict | None:
        return None

    def runs(self, run_ids: Iterable[int] | None = None) -> pd.DataFrame:
        return empty_frame("runs")

    def metrics(self, run_ids: list[int] | None = None) -> pd.DataFrame:
        return empty_frame("metrics")

    def metrics_since(self, after: Mapping[int, int]) -> pd.DataFrame:
        return no_new_metrics()

    def rename(self, run_id: int, name: str) -> None:
        return None

    def delete(self, run_id: int) -> None:
        return None

    def claim_next(self, watcher_pid: int | None = None) -> dict | None:
        return None

    def next_queued(self) -> dict | None:
        return None

    def request_cancel(self, run_id: int) -> None:
        return None

    def cancel_requested(self, run_id: int) -> bool:
        return False

    def active_run_ids(self) -> list[int]:
        return []

    def mark_orphans_interrupted(self) -> int:
        return 0
