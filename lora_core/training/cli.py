"""`python -m lora_core train`: one short LoRA fine-tuning run, written to the run store.

`add_train_parser` adds the subcommand to the main parser; `cmd_train` runs it: exit 0 when the
run completed, `EXIT_RUN_FAILED` when it started and then failed, `BadInput` / `InputError`
(printed by the main CLI as one line, exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, cast

from lora_core.cli_common import (
    EXIT_RUN_FAILED,
    add_run_flags,
    add_settings_flags,
    lora_file_or_default,
    open_store,
    train_config,
)
from lora_core.store import CLI, NullStore, Store
from lora_core.training import preflight, process_rank, run_training


def add_train_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `train` to the subparsers `commands`; returns it."""
    train = commands.add_parser("train", help="a short LoRA fine-tuning run, written to the run store")
    train.add_argument("--steps", type=int, default=60)
    add_run_flags(train, "run name", "adapter_config.json with the LoRA settings")
    add_settings_flags(train)
    train.add_argument("--json", action="store_true", help="end with one JSON object instead of a summary")
    train.set_defaults(handler=cmd_train)
    return train


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run from parsed `args`, with a progress bar on stderr (or one JSON object on
    stdout with --json); returns 0 when it completed, else `EXIT_RUN_FAILED`."""
    settings = lora_file_or_default(args)
    config = train_config(args)
    preflight(config, settings)  # bad input exits 2 here, before a run exists
    # Under `accelerate launch` on several GPUs every rank trains; only rank 0 writes the run.
    primary = process_rank() == 0
    # NullStore answers every Store method as an empty store would (tests/test_store.py checks).
    store = open_store(args.out) if primary else cast(Store, NullStore())
    label = args.name or f"cli r={settings.r}"
    run_id = store.create_run(label, config.model, config.dataset, settings.to_peft_dict(), vars(config), owner=CLI)
    stop = threading.Event()
    progress = threading.Thread(target=print_progress, args=(store, run_id, config.steps, stop), daemon=True)
    if not args.json and primary:
        progress.start()
    try:
        result = run_training(store, run_id, config, settings)
    finally:
        stop.set()
    code = 0 if result.status == "completed" else EXIT_RUN_FAILED
    if not primary:
        return code
    run = store.run(run_id) or {}
    if args.json:
        memory = {key: run.get(key) for key in ("peak_memory_mb", "memory_estimate_mb", "longest_seq")}
        print(
            json.dumps({**result.to_dict(), **memory, "store": str(store.path), "adapter_dir": run.get("adapter_dir")})
        )
        return code
    progress.join(timeout=2)
    _print_run(run_id, result, run)
    return code


def _print_run(run_id: int, result, run: dict) -> None:
    """The run's outcome, losses, peak memory against its estimate, and adapter folder."""
    print(f"\nrun {run_id}: {result.status}" + (f" ({result.error})" if result.error else ""))
    if result.eval_losses:
        print(
            f"eval loss {result.eval_losses[0][1]:.4f} -> {result.eval_losses[-1][1]:.4f}; {result.tokens_per_s:,.0f} tokens/s"
        )
    if run.get("peak_memory_mb"):
        line = f"peak memory {run['peak_memory_mb']:,.0f} MiB"
        if run.get("memory_estimate_mb"):
            error = run["memory_estimate_mb"] / run["peak_memory_mb"] - 1
            line += f" (estimate {run['memory_estimate_mb']:,.0f} MiB, {error:+.1%})"
        print(line)
    if run.get("adapter_dir"):
        print(f"adapter: {run['adapter_dir']}")


def print_progress(store, run_id: int, steps: int, stop) -> None:
    """A one-line progress bar on stderr while the run trains; returns once `stop` is set."""
    while not stop.wait(0.5):
        metrics = store.metrics([run_id])
        train = metrics[metrics["kind"] == "train"]
        if train.empty:
            continue
        step = int(train["step"].max())
        bar = "#" * int(30 * step / steps)
        loss = train["loss"].iloc[-1]
        print(f"\r[{bar:<30}] {step}/{steps} loss {loss:.4f}", end="", file=sys.stderr, flush=True)
        time.sleep(0)
