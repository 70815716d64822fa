"""`python -m lora_core sweep`: an experiment, a grid of LoRA configs trained and compared.

`add_sweep_parser` adds the subcommand to the main parser; `cmd_sweep` runs it, here one trial
after another or as Ray Tune trials (`ray_tune`, imported only then: Ray is an optional extra).
Exit 0 when every trial completed, `EXIT_RUN_FAILED` when one did not, `BadInput` / `InputError`
(printed by the main CLI as one line, exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lora_core.cli_common import (
    EXIT_RUN_FAILED,
    BadInput,
    add_run_flags,
    add_settings_flags,
    json_text,
    lora_file_or_default,
    open_store,
    train_config,
)
from lora_core.experiments import (
    DIMENSIONS,
    parse_grid,
    plan_experiment,
    ranked,
    results,
    run_local,
    submit_experiment,
)
from lora_core.store import CLI
from lora_core.strategies import SEARCH_SPACES


def add_sweep_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `sweep` to the subparsers `commands`; returns it."""
    sweep = commands.add_parser("sweep", help="an experiment: a grid of LoRA configs trained and compared")
    budget = sweep.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=20, help="training steps per trial (default 20)")
    budget.add_argument("--tokens", type=int, help="training tokens per trial (batch x sequence length per step)")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a dimension and its values, repeatable: targets=Q,V|All linear (values split on |), r=4,16, "
        "alpha=16,2r, lr=1e-4,1e-3, dropout=0,0.1, rslora=true,false, dora=..., loraplus=off,16, "
        "init=default,pissa,olora",
    )
    sweep.add_argument(
        "--space", choices=tuple(SEARCH_SPACES), help="the article's search space (grid items override it)"
    )
    sweep.add_argument("--seeds", type=int, default=1, help="repeats of each config with seeds 0, 1, ... (default 1)")
    sweep.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the trials as Ray Tune trials: auto ($RAY_ADDRESS, a running local cluster, else a new "
        "local one) or host:port / ray://host:port. Without it, $RAY_ADDRESS alone selects Ray too",
    )
    sweep.add_argument("--local", action="store_true", help="train here even when $RAY_ADDRESS is set")
    sweep.add_argument("--asha", action="store_true", help="on Ray: stop weak trials early (ASHA on eval loss)")
    sweep.add_argument(
        "--ray-storage",
        metavar="PATH",
        help="on Ray: where trials' adapters travel as Tune checkpoints (default: the data dir; on several "
        "machines a shared folder or a bucket such as s3://...)",
    )
    add_run_flags(sweep, "experiment name", "adapter_config.json with the base LoRA settings of every trial")
    add_settings_flags(sweep)
    sweep.add_argument("--json", action="store_true", help="end with one JSON object instead of a table")
    sweep.set_defaults(handler=cmd_sweep)
    return sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    """Plan, record and run the experiment of parsed `args`, then print its ranked table (or one
    JSON object with --json); returns 0 when every trial completed, else `EXIT_RUN_FAILED`."""
    address = _ray_address(args)
    settings = lora_file_or_default(args)
    config = train_config(args)
    grid = parse_grid(args.grid)
    if not grid and not args.space:
        raise BadInput("give --grid NAME=V1,V2 (repeatable) or --space efficiency|balanced|thorough")
    plan = plan_experiment(settings, config, grid, args.space, args.seeds, args.tokens, args.name)
    if args.asha and not address:
        raise BadInput("--asha stops trials early on a Ray cluster: add --ray (or drop --asha)")
    if address:
        from lora_core.experiments.ray_tune import check_ray

        trial = plan.trials[0].config
        check_ray(address, args.asha, trial.steps, trial.eval_every, trial.report_to)  # before anything is written
    store = open_store(args.out)
    runner = "ray" if address else "local"
    experiment_id = submit_experiment(store, plan, runner=runner, owner=CLI, ray_address=address, asha=args.asha)
    total = len(plan.trials)
    if not args.json:
        where = f"on Ray ({address})" if address else "here, one after another"
        print(
            f"experiment {experiment_id}: {total} trials of {plan.trials[0].config.steps} steps, {where}",
            file=sys.stderr,
        )
    _run(store, experiment_id, address, args)
    experiment = store.experiment(experiment_id) or {}
    table = results(store, experiment_id)
    code = (
        0 if experiment.get("status") == "completed" and not (table["status"] != "completed").any() else EXIT_RUN_FAILED
    )
    if args.json:
        print(json_text(_sweep_json(store, experiment_id, experiment, table)))
        return code
    _print_sweep(table)
    return code


def _run(store, experiment_id: int, address: str | None, args: argparse.Namespace) -> None:
    """Train the experiment's trials on Ray at `address`, else here, saying on stderr how each
    went (unless --json); returns when all have ended."""

    def progress(result) -> None:
        if args.json:
            return
        run = store.run(result.run_id) or {}
        loss = run.get("final_eval_loss")
        ending = f"eval loss {loss:.4f}" if loss is not None else (result.error or "")
        print(f"  {run.get('name', result.run_id)}: {result.status} {ending}", file=sys.stderr)

    if address:
        from lora_core.experiments.ray_tune import run_on_ray

        summary = run_on_ray(store, experiment_id, address, asha=args.asha, storage_path=args.ray_storage)
        if not args.json:
            print(
                f"Ray: {summary.address}, {summary.cpus:g} CPUs, {summary.gpus:g} GPUs; start-up {summary.ray_start_s:.1f} s,"
                f" trials {summary.tune_s:.1f} s",
                file=sys.stderr,
            )
    else:
        run_local(store, experiment_id, on_trial=progress)


def _ray_address(args: argparse.Namespace) -> str | None:
    """Where the trials run: --ray's address, else $RAY_ADDRESS, else None (here); --local wins."""
    if args.local:
        if args.ray:
            raise BadInput("--local and --ray contradict each other: give one")
        return None
    if args.ray_storage and args.ray is None and not os.environ.get("RAY_ADDRESS"):
        raise BadInput("--ray-storage only applies on Ray: add --ray")
    address = args.ray if args.ray is not None else os.environ.get("RAY_ADDRESS")
    if address is not None and not address.strip():
        raise BadInput("--ray: give an address (host:port, ray://host:port) or auto")
    return address.strip() if address else None


def _sweep_json(store, experiment_id: int, experiment: dict, table) -> dict:
    """The experiment id, its status and store, and per trial its settings and outcome."""
    trials = []
    for row in table.to_dict("records"):
        run = store.run(int(row["run_id"])) or {}
        trials.append(
            {
                "run_id": row["run_id"],
                "trial": row["trial"],
                "label": row["label"],
                "values": {name: row[name] for name in (*DIMENSIONS, "seed") if name in row},
                "settings": run.get("settings"),
                "trainable_params": row["trainable_params"],
                "memory_estimate_mb": row["memory_estimate_mb"],
                "peak_memory_mb": row["peak_memory_mb"],
                "final_train_loss": row["final_train_loss"],
                "final_eval_loss": row["final_eval_loss"],
                "tokens_per_s": row["tokens_per_s"],
                "train_seconds": row["train_seconds"],
                "status": row["status"],
                "error": row["error"],
                "trained_by": row["trained_by"],
            }
        )
    best = ranked(table)
    return {
        "experiment_id": experiment_id,
        "name": experiment.get("name"),
        "status": experiment.get("status"),
        "runner": experiment.get("runner"),
        "store": str(store.path),
        "trials": trials,
        "best_run_id": int(best["run_id"].iloc[0]) if len(best) else None,
    }


def _print_sweep(table) -> None:
    """The trials ranked by eval loss with their seed spread, size and verdict, then the failed ones."""
    best = ranked(table)
    print(f"{'rank':>4}  {'config':<44} {'eval loss':>9} {'spread':>7} {'trainable':>11}  verdict")
    for row in best.to_dict("records"):
        spread = (
            ""
            if row["seed_spread"] is None or row["seed_spread"] != row["seed_spread"]
            else f"{row['seed_spread']:.4f}"
        )
        print(
            f"{row['rank']:>4}  {row['label'][:44]:<44} {row['eval_loss']:>9.4f} {spread:>7} "
            f"{int(row['trainable_params'] or 0):>11,}  {row['verdict']}"
        )
    failed = table[table["status"] != "completed"]
    for row in failed.to_dict("records"):
        print(f"  trial {row['trial']} {row['label']}: {row['status']} ({row['error'] or 'no reason recorded'})")
