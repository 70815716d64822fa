"""The trackers a run can report to through Trainer's `report_to` (MLflow, TensorBoard, W&B):
which exist and are installed, TensorBoard's callback, and the tracker runs a run opens, ended
however it ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lora_core.errors import short_repr

if TYPE_CHECKING:
    from lora_core.store import RunWriter

TRACKERS = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def tracker_problems(report_to: Any) -> list[str]:
    """What stops a run from reporting to `report_to`: an unknown tracker or one not installed."""
    if not isinstance(report_to, tuple) or not all(isinstance(name, str) for name in report_to):
        return [f"`report_to` must list tracker names, got {short_repr(report_to)}"]
    import importlib.util

    found = []
    for name in report_to:
        if name not in TRACKERS:
            found.append(f"`report_to`: unknown tracker {short_repr(name)}; use {', '.join(TRACKERS)}")
        elif not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            found.append(f"`report_to`: {name} needs the {TRACKERS[name][0]} package: pip install {TRACKERS[name][0]}")
    return found


def tensorboard_callbacks(store: RunWriter, run_id: int, report_to: tuple[str, ...]) -> list:
    """Trainer's TensorBoard callback writing to $TENSORBOARD_LOGGING_DIR or the data dir's
    tensorboard/run-<id> (its default, under the run's scratch folder, is deleted when it ends)."""
    if "tensorboard" not in report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = callback.logging_dir or str(store.data_dir / "tensorboard" / f"run-{run_id}")
    return [callback]


@contextlib.contextmanager
def tracker_runs(report_to: tuple[str, ...]) -> Iterator[None]:
    """End the MLflow and W&B runs that a run's Trainer opened, however the run ends ("FAILED" /
    exit code 1 on an exception), so the next run in this process (an experiment's next trial, the
    worker's next job) opens its own: transformers' W&B callback never finishes its run, and its
    MLflow callback ends its run only when training returns. A tracker run open before (the
    caller's own) is left open."""
    before = _tracker_run_ids(report_to)
    failed = True
    try:
        yield
        failed = False
    finally:
        for name, tracker_run in _tracker_run_ids(report_to).items():
            if tracker_run is not None and tracker_run != before[name]:
                if name == "mlflow":
                    import mlflow

                    mlflow.end_run("FAILED" if failed else "FINISHED")
                else:
                    import wandb

                    wandb.finish(exit_code=int(failed))


def _tracker_run_ids(report_to: tuple[str, ...]) -> dict[str, str | None]:
    """The id of the MLflow and W&B run open in this process, for those of `report_to`."""
    ids: dict[str, str | None] = {}
    if "mlflow" in report_to:
        import mlflow

        active = mlflow.active_run()
        ids["mlflow"] = active.info.run_id if active else None
    if "wandb" in report_to:
        import wandb

        ids["wandb"] = wandb.run.id if wandb.run else None
    return ids
