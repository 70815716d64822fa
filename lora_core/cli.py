"""`python -m lora_core`: count LoRA parameters, list the catalogue, map strategies, run a search space.

Exit codes: 0 success (for `train`: the run completed); 2 bad input, with one line on stderr and
nothing created; 1 a run that started and then failed or was cancelled (its JSON still printed
with --json). Any other error is a bug: it keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from lora_core import options
from lora_core.errors import InputError, one_line
from lora_core.export import FORMATS
from lora_core.strategies import SEARCH_SPACES
from lora_core.training.config import TRACKERS

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's own code for a process ended by Ctrl-C
_MAX_LORA_FILE_BYTES = 1_000_000
_MAX_ERROR_CHARS = 300


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        if len(message) > _MAX_ERROR_CHARS:  # argparse echoes the value: a 5,000-digit number stays readable
            message = message[: _MAX_ERROR_CHARS - 3] + "..."
        raise _BadInput(f"{self.prog}: {message}")


class _BadInput(Exception):
    pass


def run() -> NoReturn:
    """The `lora-explorer` console script and `python -m lora_core`: `main`, then exit with its code."""
    try:
        code = main()
        sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C: what it stopped is recorded (a sweep's trials read cancelled)
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`... | head`): say nothing more; Python's own flush at exit would
        # raise again on the closed pipe, so stdout points at /dev/null from here on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments), run the command; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):  # a path with undecodable bytes prints escaped, not as a traceback
        if isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(ValueError):
                stream.reconfigure(errors="backslashreplace")
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return args.handler(args)
    except (_BadInput, InputError) as error:  # the engine's own types only: anything else is a bug
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lora_core", description="LoRA Explorer engine: exact PEFT parameter counts.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    count = commands.add_parser("count", help="trainable / all parameters of a LoRA config on a model")
    count.add_argument("--model", required=True, help="catalogue id, Hub id, model folder or config.json path")
    count.add_argument("--lora", action="append", default=[], help="adapter_config.json (repeat for several)")
    _add_settings_flags(count)
    count.add_argument("--modules", action="store_true", help="print every adapted module, not the per-role summary")
    count.add_argument("--json", action="store_true", help="print JSON instead of a table")
    count.set_defaults(handler=_cmd_count)

    catalogue = commands.add_parser("catalogue", help="list the bundled model configs")
    catalogue.add_argument("--json", action="store_true")
    catalogue.set_defaults(handler=_cmd_catalogue)

    strategies = commands.add_parser("strategies", help="Q,V / All attention / FFN only / All linear on a model")
    strategies.add_argument("--model", required=True)
    strategies.add_argument("--r", type=int, default=16)
    strategies.add_argument("--alpha", type=float, default=None)
    strategies.add_argument("--json", action="store_true")
    strategies.set_defaults(handler=_cmd_strategies)

    export = commands.add_parser("export", help="the config as PEFT JSON, full JSON, Axolotl, LLaMA-Factory or Python")
    export.add_argument("--model", required=True)
    export.add_argument("--lora", help="adapter_config.json (or a full JSON export) to start from")
    export.add_argument("--format", choices=FORMATS, default="peft")
    _add_settings_flags(export)
    export.set_defaults(handler=_cmd_export)

    memory = commands.add_parser("memory", help="peak training memory of a LoRA config, term by term, and what fits")
    memory.add_argument("--model", required=True, help="catalogue id, Hub id, model folder or config.json path")
    memory.add_argument("--lora", help="adapter_config.json with the LoRA settings (default: r=8 on q_proj,v_proj)")
    _add_settings_flags(memory)
    memory.add_argument("--batch", type=int, default=4, help="per-device batch size")
    memory.add_argument("--seq", type=int, default=1024, help="tokens per sequence (padded length)")
    memory.add_argument("--dtype", choices=options.DTYPES, default="bf16", help="base weights/activations")
    memory.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights (bitsandbytes, double quant)")
    memory.add_argument("--int8", action="store_true", help="LLM.int8 base weights (bitsandbytes)")
    memory.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantisation")
    memory.add_argument(
        "--bnb-saves-input",
        action="store_true",
        help="bitsandbytes before 0.43.2, which kept every 4-bit matmul's input for backward",
    )
    memory.add_argument("--grad-checkpointing", action="store_true")
    memory.add_argument("--optimizer", choices=options.OPTIMIZERS, default="adamw")
    memory.add_argument("--attention", choices=options.ATTENTIONS, default="sdpa")
    memory.add_argument("--device", choices=options.MEMORY_DEVICES, default="cuda")
    memory.add_argument("--eval-batch", type=int, help="add an evaluation pass with this batch size")
    memory.add_argument("--adapter-dtype", choices=options.DTYPES, default="fp32")
    memory.add_argument("--no-autocast", action="store_true", help="a 16-bit model trained without autocast")
    memory.add_argument("--fits", action="store_true", help="also list the largest batch/sequence per GPU size")
    memory.add_argument("--json", action="store_true", help="print JSON instead of tables")
    memory.set_defaults(handler=_cmd_memory)

    train = commands.add_parser("train", help="a short LoRA fine-tuning run, written to the run store")
    train.add_argument("--steps", type=int, default=60)
    _add_run_flags(train, "run name", "adapter_config.json with the LoRA settings")
    _add_settings_flags(train)
    train.add_argument("--json", action="store_true", help="end with one JSON object instead of a summary")
    train.set_defaults(handler=_cmd_train)

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
    _add_run_flags(sweep, "experiment name", "adapter_config.json with the base LoRA settings of every trial")
    _add_settings_flags(sweep)
    sweep.add_argument("--json", action="store_true", help="end with one JSON object instead of a table")
    sweep.set_defaults(handler=_cmd_sweep)

    search = commands.add_parser("search", help="the article's search spaces counted on a model")
    search.add_argument("--model", required=True)
    search.add_argument("--space", choices=tuple(SEARCH_SPACES), default="balanced")
    search.add_argument("--json", action="store_true")
    search.set_defaults(handler=_cmd_search)

    from lora_core.advisor.cli import add_advise_parser
    from lora_core.inspect.cli import add_inspect_parser

    add_advise_parser(commands)
    add_inspect_parser(commands, _Parser)
    return parser


def _add_run_flags(parser: argparse.ArgumentParser, name_help: str, lora_help: str) -> None:
    """What `train` and `sweep` train on and how (`_train_config` reads them), and where it is kept."""
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a Hub id or a folder")
    parser.add_argument(
        "--dataset", default="json_extraction", help="built-in task, upload:PATH (JSONL/CSV) or hub:REPO"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (sweep: of trials the grid does not set)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument(
        "--report-to", action="append", default=[], choices=tuple(TRACKERS), help="a tracker, repeatable"
    )
    parser.add_argument("--lora", help=lora_help)
    parser.add_argument(
        "--out", help="data directory of the run store (default: $LORA_EXPLORER_DATA or the user data dir)"
    )
    parser.add_argument("--name", help=name_help)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--r", type=int, help="rank (default 8, or the --lora file's)")
    parser.add_argument("--alpha", type=float, help="lora_alpha")
    parser.add_argument("--dropout", type=float, help="lora_dropout")
    parser.add_argument("--targets", help="comma list (q_proj,v_proj), 'all-linear', or re:REGEX for a regex")
    parser.add_argument("--target-parameters", help="comma list of parameter names (MoE experts)")
    parser.add_argument("--exclude", help="comma list of modules to exclude")
    parser.add_argument("--rank-pattern", action="append", default=[], metavar="KEY=R", help="per-module rank")
    parser.add_argument("--alpha-pattern", action="append", default=[], metavar="KEY=A", help="per-module alpha")
    parser.add_argument("--layers", help="layers_to_transform, e.g. 0,1,2 or 0-15")
    parser.add_argument("--layers-pattern", help="layers_pattern, e.g. layers")
    parser.add_argument("--use-dora", action="store_true", default=None)
    parser.add_argument("--use-rslora", action="store_true", default=None)
    parser.add_argument("--bias", choices=options.BIASES)
    parser.add_argument("--lora-bias", action="store_true", default=None)
    parser.add_argument("--modules-to-save", help="comma list of modules trained in full")


def settings_from_args(args: argparse.Namespace, base=None):
    """A LoraSettings from the flags, on top of `base` (an --lora file's settings) when given."""
    from lora_core.settings import LoraSettings, parse_targets

    settings = base or LoraSettings()
    changes: dict[str, Any] = {}
    for flag, field in (("r", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("bias", "bias")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    for flag, field in (("use_dora", "use_dora"), ("use_rslora", "use_rslora"), ("lora_bias", "lora_bias")):
        if getattr(args, flag):
            changes[field] = True
    if args.targets:
        changes["target_modules"] = parse_targets(args.targets)
    if args.target_parameters:
        changes["target_parameters"] = _csv(args.target_parameters)
    if args.exclude:
        changes["exclude_modules"] = _csv(args.exclude)
    if args.modules_to_save:
        changes["modules_to_save"] = _csv(args.modules_to_save)
    if args.rank_pattern:
        changes["rank_pattern"] = {**settings.rank_pattern, **_pairs(args.rank_pattern, int, "--rank-pattern")}
    if args.alpha_pattern:
        changes["alpha_pattern"] = {**settings.alpha_pattern, **_pairs(args.alpha_pattern, float, "--alpha-pattern")}
    if args.layers:
        changes["layers_to_transform"] = _layers(args.layers)
    if args.layers_pattern:
        changes["layers_pattern"] = args.layers_pattern
    if "lora_alpha" not in changes and isinstance(changes.get("r"), int) and changes["r"] > 0 and base is None:
        changes["lora_alpha"] = changes["r"]  # alpha = r unless told otherwise: the article's default
    return settings.replace(**changes)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _pairs(items: list[str], cast, flag: str) -> dict[str, Any]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _BadInput(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            result[key] = cast(value)
        except ValueError:
            raise _BadInput(f"{flag} {key}: {value!r} is not a {cast.__name__}") from None
    return result


def _layers(text: str) -> tuple[int, ...]:
    """`0,1,4-7` as layer indices; bounds are checked before a range is expanded (`0-99999999`
    once took 6.9 GB)."""
    from lora_core.settings import MAX_LAYER

    layers: set[int] = set()
    for part in _csv(text):
        low, dash, high = part.partition("-")
        try:
            bounds = (int(low), int(high) if dash else int(low))
        except ValueError:
            raise _BadInput(f"--layers takes integers and ranges like 0,1,4-7, got {text!r}") from None
        if not 0 <= bounds[0] <= bounds[1] < MAX_LAYER:
            raise _BadInput(f"--layers {part}: layer indices run from 0 to {MAX_LAYER - 1}, low to high")
        layers.update(range(bounds[0], bounds[1] + 1))
    return tuple(sorted(layers))


def _lora_file_or_default(args: argparse.Namespace):
    """The settings of --lora's file (else r=8, alpha=16 on q_proj,v_proj) with the flags on top."""
    from lora_core.settings import LoraSettings

    base = (
        _load_lora_file(args.lora)
        if args.lora
        else LoraSettings(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    )
    return settings_from_args(args, base)


def _load_lora_file(path: str):
    from lora_core.settings import LoraSettings, LoraSettingsError, parse_json, unknown_keys

    try:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "adapter_config.json"
        if not file.is_file():
            raise _BadInput(f"--lora {path}: no such file")
        if file.stat().st_size > _MAX_LORA_FILE_BYTES:
            raise _BadInput(
                f"--lora {path}: over {_MAX_LORA_FILE_BYTES:,} bytes; an adapter_config.json is far smaller"
            )
        data = parse_json(file.read_bytes())
        settings = LoraSettings.from_peft_dict(data)
    except (LoraSettingsError, OSError, RuntimeError) as error:  # unreadable, a name too long, ~nosuchuser
        raise _BadInput(f"--lora {path}: {one_line(error)}") from None
    ignored = unknown_keys(data)
    if ignored:
        print(
            f"warning: --lora {path}: ignored keys PEFT's LoraConfig does not know: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return settings


def _cmd_count(args: argparse.Namespace) -> int:
    from lora_core.counting import count_lora_params
    from lora_core.models import inventory, resolve_model

    inv = inventory(resolve_model(args.model))
    bases = [_load_lora_file(path) for path in args.lora] or [None]
    results = [count_lora_params(inv, settings_from_args(args, base)) for base in bases]
    if args.json:
        payload = [r.to_dict() for r in results]
        print(json.dumps(payload if len(args.lora) > 1 else payload[0], indent=2))
        return 0
    for label, result in zip(args.lora or [None], results):
        print(_count_table(result, label, args.modules))
    return 0


def _count_table(result, label: str | None, all_modules: bool) -> str:
    lines = [
        f"model             {result.model_id}" + (f"   ({label})" if label else ""),
        f"trainable params  {result.trainable_params:,}",
        f"all params        {result.all_params:,}",
        f"base params       {result.base_params:,}",
        f"trainable %       {result.percent_trainable:.4f}",
    ]
    lines += [f"warning: {w}" for w in result.warnings]
    modules = result.modules
    if all_modules:
        table = modules[["name", "layer", "role", "in_features", "out_features", "rank", "alpha", "scale", "params"]]
    else:
        table = (
            modules.groupby(["role", "in_features", "out_features", "rank", "alpha", "scale"], as_index=False)
            .agg(modules=("name", "size"), params=("params", "sum"))
            .sort_values("params", ascending=False)
        )
    lines += ["", table.to_string(index=False)]
    return "\n".join(lines) + "\n"


def _cmd_memory(args: argparse.Namespace) -> int:
    from lora_core.counting import count_lora_params
    from lora_core.memory import GIB, TrainSetup, estimate_memory, fits_table
    from lora_core.models import inventory, resolve_model

    if args.qlora and args.int8:
        raise _BadInput("--qlora and --int8 exclude each other: pick one quantisation")
    settings = _lora_file_or_default(args)
    setup = TrainSetup(
        batch_size=args.batch,
        seq_len=args.seq,
        dtype=args.dtype,
        quantization="nf4" if args.qlora else ("int8" if args.int8 else "none"),
        double_quant=not args.no_double_quant,
        bnb_saves_input=args.bnb_saves_input,
        optimizer=args.optimizer,
        gradient_checkpointing=args.grad_checkpointing,
        attention=args.attention,
        device=args.device,
        eval_batch_size=args.eval_batch,
        adapter_dtype=options.adapter_dtype_for(args.dtype, args.adapter_dtype),
        autocast=not args.no_autocast,
    )
    inv = inventory(resolve_model(args.model))
    count = count_lora_params(inv, settings)
    estimate = estimate_memory(inv, settings, setup, count)
    fits = fits_table(inv, settings, setup, count=count) if args.fits else None
    if args.json:
        payload = estimate.to_dict()
        if fits is not None:
            payload["fits"] = fits.to_dict(orient="records")
        print(json.dumps(payload, indent=2))
        return 0
    table = estimate.table()
    width = int(table["term"].str.len().max())
    # formulas left-aligned after the figures: right-aligned, a long one pushed every other off screen
    terms = [f"{'term':>{width}}       GiB  formula"]
    terms += [f"{row.term:>{width}}  {row.GiB:8.3f}  {row.formula}" for row in table.itertuples()]
    lines = [
        f"model       {estimate.model_id}",
        f"setup       batch {setup.batch_size} x seq {setup.seq_len}, {setup.dtype}"
        + (f", {setup.quantization}" if setup.quantization != "none" else "")
        + (", gradient checkpointing" if setup.gradient_checkpointing else "")
        + f", {setup.optimizer}, {setup.attention}, {setup.device}",
        f"trainable   {count.trainable_params:,}",
        "",
        *terms,
        "",
        f"peak ({estimate.phase})  {estimate.peak_bytes / GIB:.2f} GiB"
        + ("  (max_memory_allocated)" if setup.device == "cuda" else "  (peak RSS)"),
        f"needs       {estimate.required_bytes / GIB:.2f} GiB on the device",
    ]
    lines += [f"note: {note}" for note in estimate.notes]
    if fits is not None:
        lines += ["", fits.to_string(index=False, float_format=lambda v: f"{v:.1f}")]
    print("\n".join(lines))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lora_core.export import export
    from lora_core.models import inventory, resolve_model

    inv = inventory(resolve_model(args.model))
    base = _load_lora_file(args.lora) if args.lora else None
    print(export(settings_from_args(args, base), inv, args.format), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import threading

    from lora_core.store import CLI, NullStore, Store
    from lora_core.training import preflight, process_rank, run_training

    settings = _lora_file_or_default(args)
    config = _train_config(args)
    preflight(config, settings)  # bad input exits 2 here, before a run exists
    # Under `accelerate launch` on several GPUs every rank trains; only rank 0 writes the run.
    primary = process_rank() == 0
    # NullStore answers every Store method as an empty store would (tests/test_store.py checks).
    store = _open_store(args.out) if primary else cast(Store, NullStore())
    label = args.name or f"cli r={settings.r}"
    run_id = store.create_run(label, config.model, config.dataset, settings.to_peft_dict(), vars(config), owner=CLI)
    stop = threading.Event()
    progress = threading.Thread(target=_print_progress, args=(store, run_id, config.steps, stop), daemon=True)
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
    return code


def _train_config(args: argparse.Namespace):
    """The `TrainConfig` of `train`'s and `sweep`'s shared flags (checked by `preflight`)."""
    from lora_core.training import TrainConfig

    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=args.eval_every,
        device=args.device,
        report_to=tuple(dict.fromkeys(args.report_to)),
    )


def _cmd_sweep(args: argparse.Namespace) -> int:
    from lora_core.experiments import parse_grid, plan_experiment, results, run_local, submit_experiment
    from lora_core.store import CLI

    address = _ray_address(args)
    settings = _lora_file_or_default(args)
    config = _train_config(args)
    grid = parse_grid(args.grid)
    if not grid and not args.space:
        raise _BadInput("give --grid NAME=V1,V2 (repeatable) or --space efficiency|balanced|thorough")
    plan = plan_experiment(settings, config, grid, args.space, args.seeds, args.tokens, args.name)
    if args.asha and not address:
        raise _BadInput("--asha stops trials early on a Ray cluster: add --ray (or drop --asha)")
    if address:
        from lora_core.experiments.ray_tune import check_ray

        trial = plan.trials[0].config
        check_ray(address, args.asha, trial.steps, trial.eval_every, trial.report_to)  # before anything is written
    store = _open_store(args.out)
    runner = "ray" if address else "local"
    experiment_id = submit_experiment(store, plan, runner=runner, owner=CLI, ray_address=address)
    total = len(plan.trials)
    if not args.json:
        where = f"on Ray ({address})" if address else "here, one after another"
        print(
            f"experiment {experiment_id}: {total} trials of {plan.trials[0].config.steps} steps, {where}",
            file=sys.stderr,
        )

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


def _ray_address(args: argparse.Namespace) -> str | None:
    """Where the trials run: --ray's address, else $RAY_ADDRESS, else None (here); --local wins."""
    if args.local:
        if args.ray:
            raise _BadInput("--local and --ray contradict each other: give one")
        return None
    if args.ray_storage and args.ray is None and not os.environ.get("RAY_ADDRESS"):
        raise _BadInput("--ray-storage only applies on Ray: add --ray")
    address = args.ray if args.ray is not None else os.environ.get("RAY_ADDRESS")
    if address is not None and not address.strip():
        raise _BadInput("--ray: give an address (host:port, ray://host:port) or auto")
    return address.strip() if address else None


def _sweep_json(store, experiment_id: int, experiment: dict, table) -> dict:
    """The experiment id, its status and store, and per trial its settings and outcome."""
    from lora_core.experiments import DIMENSIONS, ranked

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


def json_text(data: Any, indent: int | None = None) -> str:
    """`data` as strict JSON: numpy and pandas scalars as plain numbers, and NaN, infinity and
    pandas' NA (a missing value) as null. `json.dumps` never hands a plain float to `default`,
    so non-finite floats are replaced first; `allow_nan=False` guards the rule."""
    return json.dumps(_finite(data), indent=indent, default=_json_default, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    import pandas as pd

    if value is pd.NA:
        return None
    if hasattr(value, "item"):
        return _finite(value.item())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _print_sweep(table) -> None:
    from lora_core.experiments import ranked

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


def _open_store(out: str | None):
    """The run store at --out (or the default data dir); a folder that cannot hold it is bad input."""
    import sqlite3

    from lora_core.store import Store

    try:
        return Store.open(out)
    except (OSError, sqlite3.Error) as error:
        where = out or "the default data directory"
        reason = getattr(error, "strerror", None) or one_line(error)
        raise _BadInput(f"--out {where}: cannot keep the run store there ({reason}); pick a writable folder") from None


def _print_progress(store, run_id: int, steps: int, stop) -> None:
    """A one-line progress bar on stderr while the run trains."""
    import time

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


def _cmd_catalogue(args: argparse.Namespace) -> int:
    from lora_core.models import catalogue_ids, inventory, resolve_model

    rows = []
    for model_id in catalogue_ids():
        inv = inventory(resolve_model(model_id))
        rows.append(
            {"model": model_id, "model_type": inv.model_type, "class": inv.model_class, "params": inv.total_params}
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['model']:<40} {row['model_type']:<11} {row['params']:>16,}")
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from lora_core.settings import LoraSettings
    from lora_core.strategies import compare_strategies

    alpha = args.alpha if args.alpha is not None else max(args.r, 1)  # a bad r is reported once, as r
    problems = LoraSettings(r=args.r, lora_alpha=alpha).problems()  # before the table hides them in a column
    if problems:
        raise _BadInput("; ".join(problems))
    table = compare_strategies(args.model, args.r, alpha)
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        columns = ["strategy", "targets", "modules", "trainable_params", "percent", "size_16bit_mb", "note", "error"]
        print(table[[c for c in columns if c in table]].to_string(index=False))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from lora_core.strategies import count_search_space

    table = count_search_space(args.model, args.space)
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        print(table.to_string(index=False))
    return 0
