"""`python -m lora_core`: count LoRA parameters, list the catalogue, map strategies, run a search space.

Exit codes: 0 success (for `train`: the run completed); 2 bad input, with one line on stderr and
nothing created; 1 a run that started and then failed or was cancelled (its JSON still printed
with --json). Any other error is a bug: it keeps its traceback (exit 1).

The model commands live here; `train`, `sweep`, `advise` and `inspect` live beside the code they
run (`training.cli`, `experiments.cli`, `advisor.cli`, `inspect.cli`) and add themselves to the
parser; what they share (flags, exit codes, JSON output) is `cli_common`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from lora_core import options
from lora_core.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    BadInput,
    Parser,
    add_settings_flags,
    json_text,
    load_lora_file,
    lora_file_or_default,
    settings_from_args,
)
from lora_core.errors import InputError, one_line
from lora_core.experiments.cli import add_sweep_parser
from lora_core.export import FORMATS
from lora_core.strategies import SEARCH_SPACES
from lora_core.training.cli import add_train_parser

# Still importable from here since `train` and `sweep` moved out (the advisor, the inspector, tests).
__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_RUN_FAILED",
    "json_text",
    "main",
    "run",
    "settings_from_args",
]


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
    except (BadInput, InputError) as error:  # the engine's own types only: anything else is a bug
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lora_core", description="LoRA Explorer engine: exact PEFT parameter counts.")
    commands = parser.add_subparsers(dest="command", parser_class=Parser)

    count = commands.add_parser("count", help="trainable / all parameters of a LoRA config on a model")
    count.add_argument("--model", required=True, help="catalogue id, Hub id, model folder or config.json path")
    count.add_argument("--lora", action="append", default=[], help="adapter_config.json (repeat for several)")
    add_settings_flags(count)
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
    add_settings_flags(export)
    export.set_defaults(handler=_cmd_export)

    memory = commands.add_parser("memory", help="peak training memory of a LoRA config, term by term, and what fits")
    memory.add_argument("--model", required=True, help="catalogue id, Hub id, model folder or config.json path")
    memory.add_argument("--lora", help="adapter_config.json with the LoRA settings (default: r=8 on q_proj,v_proj)")
    add_settings_flags(memory)
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

    add_train_parser(commands)
    add_sweep_parser(commands)

    search = commands.add_parser("search", help="the article's search spaces counted on a model")
    search.add_argument("--model", required=True)
    search.add_argument("--space", choices=tuple(SEARCH_SPACES), default="balanced")
    search.add_argument("--json", action="store_true")
    search.set_defaults(handler=_cmd_search)

    from lora_core.advisor.cli import add_advise_parser
    from lora_core.inspect.cli import add_inspect_parser

    add_advise_parser(commands)
    add_inspect_parser(commands, Parser)
    return parser


def _cmd_count(args: argparse.Namespace) -> int:
    from lora_core.counting import count_lora_params
    from lora_core.models import inventory, resolve_model

    inv = inventory(resolve_model(args.model))
    bases = [load_lora_file(path) for path in args.lora] or [None]
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
        raise BadInput("--qlora and --int8 exclude each other: pick one quantisation")
    settings = lora_file_or_default(args)
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
    base = load_lora_file(args.lora) if args.lora else None
    print(export(settings_from_args(args, base), inv, args.format), end="")
    return 0


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
        raise BadInput("; ".join(problems))
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
