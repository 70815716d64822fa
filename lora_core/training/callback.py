"""What a run writes to the store while it trains: a `TrainerCallback` that records each step and
each evaluation, and stops the Trainer on a cancel or a NaN loss.

Importing this module imports transformers; the run imports it only when it starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from transformers import TrainerCallback

from lora_core.store import RunWriter


class CancelFlag(Protocol):
    """A run's cancel request: a `threading.Event`, or the runner's store-backed flag."""

    def is_set(self) -> bool: ...


class StoreCallback(TrainerCallback):
    """Writes each step's loss, learning rate, grad norm and tokens/s, and each eval loss, to the
    store; stops after the current step on cancel; fails the run on a NaN loss."""

    def __init__(self, store: RunWriter, run_id: int, cancel: CancelFlag) -> None:
        self.store, self.run_id, self.cancel = store, run_id, cancel
        self.tokens = 0
        self.start = time.perf_counter()
        self.last_time, self.last_tokens = self.start, 0
        self.nan_step: int | None = None
        self.train_losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.tokens_per_s: list[float] = []
        self.baseline: Callable[[], None] | None = None  # evaluates the base model, once

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = self.tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.cancel.is_set() or self.nan_step is not None:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.perf_counter()
        if "loss" in logs:
            self.record_step(state, control, logs, now)
        if "eval_loss" in logs:
            self.record_eval(state.global_step, float(logs["eval_loss"]), now - self.start)
        if "baseline_loss" in logs:
            self.record_eval(0, float(logs["baseline_loss"]), 0.0)
            self.store.update_run(self.run_id, initial_eval_loss=float(logs["baseline_loss"]))
        return control

    def record_step(self, state, control, logs: dict, now: float) -> None:
        """Store one training step's metrics; a non-finite loss stops the run."""
        loss = float(logs["loss"])
        tokens = self.tokens = int(state.num_input_tokens_seen)  # non-padding training tokens
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        self.train_losses.append(loss)
        self.tokens_per_s.append(rate)
        grad_norm = logs.get("grad_norm")
        self.store.add_metric(
            self.run_id,
            "train",
            state.global_step,
            loss=loss if math.isfinite(loss) else None,
            learning_rate=logs.get("learning_rate"),
            grad_norm=float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None,
            tokens=tokens,
            tokens_per_s=rate,
            elapsed=now - self.start,
        )
        if not math.isfinite(loss):
            self.nan_step = state.global_step
            control.should_training_stop = True
        elif self.baseline is not None:
            # The eval loss before training, taken once the first step's loss is stored so that
            # point shows at once: with the adapters disabled the PEFT model is the base model.
            evaluate, self.baseline = self.baseline, None
            evaluate()

    def record_eval(self, step: int, loss: float, elapsed: float) -> None:
        """Store one evaluation loss at `step` (0: the base model's, before training)."""
        self.eval_losses.append((step, loss))
        self.store.add_metric(self.run_id, "eval", step, loss=loss, tokens=self.tokens, elapsed=elapsed)
