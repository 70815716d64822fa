"""What the CLI's subcommands share: exit codes, the parser that fails in one line, strict JSON
output, the LoRA settings flags and the LoraSettings they make, the flags of a training run
(`train`, `sweep`) and the run store they write to.

Bad input raises `BadInput` (or the engine's `InputError`); `lora_core.cli.main` prints either as
one line and exits `EXIT_BAD_INPUT`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from lora_core import options
from lora_core.errors import one_line
from lora_core.training.trackers import TRACKERS

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's own code for a process ended by Ctrl-C
_MAX_LORA_FILE_BYTES = 1_000_000
_MAX_ERROR_CHARS = 300


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors raise `BadInput` (one line) instead of printing usage."""

    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        if len(message) > _MAX_ERROR_CHARS:  # argparse echoes the value: a 5,000-digit number stays readable
            message = message[: _MAX_ERROR_CHARS - 3] + "..."
        raise BadInput(f"{self.prog}: {message}")


class BadInput(Exception):
    """Bad command-line input: its message is the one line the CLI prints."""


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


def add_run_flags(parser: argparse.ArgumentParser, name_help: str, lora_help: str) -> None:
    """What `train` and `sweep` train on and how (`train_config` reads them), and where it is kept."""
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


def train_config(args: argparse.Namespace):
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


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """The LoRA settings flags (PEFT's `LoraConfig` fields) that `settings_from_args` reads."""
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
    """A LoraSettings from the flags, on top of `base` (an --lora file's settings) when given.
    Raises `BadInput` for a malformed --rank-pattern, --alpha-pattern or --layers."""
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
            raise BadInput(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            result[key] = cast(value)
        except ValueError:
            raise BadInput(f"{flag} {key}: {value!r} is not a {cast.__name__}") from None
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
            raise BadInput(f"--layers takes integers and ranges like 0,1,4-7, got {text!r}") from None
        if not 0 <= bounds[0] <= bounds[1] < MAX_LAYER:
            raise BadInput(f"--layers {part}: layer indices run from 0 to {MAX_LAYER - 1}, low to high")
        layers.update(range(bounds[0], bounds[1] + 1))
    return tuple(sorted(layers))


def lora_file_or_default(args: argparse.Namespace):
    """The settings of --lora's file (else r=8, alpha=16 on q_proj,v_proj) with the flags on top;
    `BadInput` as `load_lora_file` and `settings_from_args` raise it."""
    from lora_core.settings import LoraSettings

    base = (
        load_lora_file(args.lora)
        if args.lora
        else LoraSettings(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    )
    return settings_from_args(args, base)


def load_lora_file(path: str):
    """The LoraSettings of an adapter_config.json (or the folder holding one); `BadInput` when it
    is missing, too large or not a LoRA config. Keys PEFT does not know get a warning on stderr."""
    from lora_core.settings import LoraSettings, LoraSettingsError, parse_json, unknown_keys

    try:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "adapter_config.json"
        if not file.is_file():
            raise BadInput(f"--lora {path}: no such file")
        if file.stat().st_size > _MAX_LORA_FILE_BYTES:
            raise BadInput(f"--lora {path}: over {_MAX_LORA_FILE_BYTES:,} bytes; an adapter_config.json is far smaller")
        data = parse_json(file.read_bytes())
        settings = LoraSettings.from_peft_dict(data)
    except (LoraSettingsError, OSError, RuntimeError) as error:  # unreadable, a name too long, ~nosuchuser
        raise BadInput(f"--lora {path}: {one_line(error)}") from None
    ignored = unknown_keys(data)
    if ignored:
        print(
            f"warning: --lora {path}: ignored keys PEFT's LoraConfig does not know: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return settings


def open_store(out: str | None):
    """The run store at --out (or the default data dir); a folder that cannot hold it is bad input."""
    import sqlite3

    from lora_core.store import Store

    try:
        return Store.open(out)
    except (OSError, sqlite3.Error) as error:
        where = out or "the default data directory"
        reason = getattr(error, "strerror", None) or one_line(error)
        raise BadInput(f"--out {where}: cannot keep the run store there ({reason}); pick a writable folder") from None
