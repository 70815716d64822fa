"""`python -m lora_core inspect`: an adapter's per-module spectra, a comparison, a right-sized copy.

`add_inspect_parser` adds the subcommand to the main parser; `cmd_inspect` runs it (exit 0, or an
`InputError` that the main CLI prints as one line with exit 2).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from lora_core.cli import json_text
from lora_core.errors import InputError
from lora_core.inspect.loading import Adapter, open_adapter
from lora_core.inspect.spectra import Inspection, energy_column, inspect_adapter
from lora_core.inspect.summary import overall, usage


def add_inspect_parser(commands: Any, parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `inspect` to the subparsers `commands` (made with `parser_class`); returns it."""
    inspect = commands.add_parser(
        "inspect", help="an adapter's per-module spectra and effective ranks; compare two; right-size one"
    )
    inspect.add_argument("adapter", help="adapter folder, .zip of one, run:<id> of the run store, or a Hub id")
    inspect.add_argument("--compare", metavar="OTHER", help="a second adapter of the same base: subspace similarity")
    inspect.add_argument(
        "--right-size", type=float, metavar="ENERGY", help="ranks keeping this share of each update's energy, e.g. 0.99"
    )
    inspect.add_argument(
        "--global-rank", action="store_true", help="with --right-size: one rank for every module, not one per module"
    )
    inspect.add_argument("--out", help="with --right-size: write the truncated adapter to this folder")
    inspect.add_argument("--store", help="the run store's folder for run:<id> (default: the app's data folder)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.set_defaults(handler=cmd_inspect)
    return inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run `inspect` for parsed `args`; 0 on success, `InputError` for bad input."""
    from lora_core.inspect.compare import compare_adapters
    from lora_core.inspect.right_size import check_out_dir, plan_right_size, write_right_sized

    if args.out is not None and not args.out.strip():
        raise InputError("give a folder for --out, e.g. --out right-sized")
    if args.out is not None and args.right_size is None:
        raise InputError("--out writes the right-sized adapter: give --right-size too, e.g. --right-size 0.99")
    if args.global_rank and args.right_size is None:
        raise InputError("--global-rank chooses how to right-size: give --right-size too, e.g. --right-size 0.99")
    energy = args.right_size
    if energy is not None and not (math.isfinite(energy) and 0 < energy <= 1):
        raise InputError(f"--right-size is the share of energy to keep, in (0, 1], e.g. 0.99; got {energy}")
    out = check_out_dir(args.out) if args.out is not None else None  # refused before the slow part
    store = Path(args.store) if args.store else None
    with tempfile.TemporaryDirectory(prefix="lora-inspect-") as scratch:
        adapter = open_adapter(args.adapter, unpack_dir=Path(scratch) / "first", store_dir=store)
        other = (
            open_adapter(args.compare, unpack_dir=Path(scratch) / "second", store_dir=store) if args.compare else None
        )
        inspection = inspect_adapter(adapter)
        report: dict[str, Any] = _report(adapter, inspection)
        if other is not None:
            comparison = compare_adapters(adapter, other)
            report["compare"] = {
                "other": other.label,
                "note": comparison.note,
                "only_first": comparison.only_first,
                "only_second": comparison.only_second,
                "modules": comparison.modules.to_dict("records"),
            }
        if energy is not None:
            plan = plan_right_size(inspection, energy, "global" if args.global_rank else "per_module")
            report["right_size"] = {
                "energy": plan.energy,
                "mode": plan.mode,
                "r": plan.r,
                "relative_error": plan.relative_error,
                "parameters_before": plan.parameters_before,
                "parameters_after": plan.parameters_after,
                "ranks": plan.ranks,
                "modules": plan.modules.to_dict("records"),
            }
            if out is not None:
                report["right_size"]["out"] = str(write_right_sized(adapter, plan, out))
    if args.json:
        print(json_text(report, indent=2))
    else:
        print(_text(report, inspection))
    return 0


def _report(adapter: Adapter, inspection: Inspection) -> dict[str, Any]:
    columns = ["name", "r", "entropy_rank", *(energy_column(p) for p in inspection.energies), "norm", "top_singular"]
    frame = inspection.modules
    extra = ["magnitude_norm"] if "magnitude_norm" in frame.columns else []
    return {
        "adapter": adapter.label,
        "base_model": adapter.base_model,
        "overall": overall(inspection),
        "modules": frame[
            ["module", "type", "layer", "kind", "expert", "d_out", "d_in", "alpha", "scale", *columns, *extra]
        ].to_dict("records"),
        "by_type": usage(inspection, "type").to_dict("records"),
        "by_layer": usage(inspection, "layer").to_dict("records"),
    }


def _text(report: dict[str, Any], inspection: Inspection) -> str:
    ranks = [energy_column(p) for p in inspection.energies]
    whole = report["overall"]
    used = ", ".join(
        f"{p:.0%} of the energy in {whole[c]:,} ({whole['used_' + c[5:]]:.0%})"
        for p, c in zip(inspection.energies, ranks)
    )
    lines = [
        f"{report['adapter']}: {whole['updates']} updates, configured rank {whole['configured_rank']:,} in all; {used}"
    ]
    width = max(len(row["name"]) for row in report["modules"])
    lines.append(
        f"{'module':<{width}} {'r':>5} {'entropy':>8} " + " ".join(f"{c:>8}" for c in ranks) + f" {'norm':>10}"
    )
    for row in report["modules"]:
        lines.append(
            f"{row['name']:<{width}} {row['r']:>5} {row['entropy_rank']:>8.2f} "
            + " ".join(f"{row[c]:>8}" for c in ranks)
            + f" {row['norm']:>10.4g}"
        )
    if "compare" in report:
        compare = report["compare"]
        lines.append(f"\nsubspace similarity with {compare['other']} (phi, LoRA paper section 7.2)")
        lines.append(
            f"{'module':<{width}} {'r':>5} {'r other':>7} {'k':>4} {'phi(1,1)':>9} {'phi(k,k)':>9} {'out phi(k,k)':>12}"
        )
        for row in compare["modules"]:
            lines.append(
                f"{row['name']:<{width}} {row['r_first']:>5} {row['r_second']:>7} {row['k']:>4} "
                f"{row['phi_top']:>9.3f} {row['phi_k']:>9.3f} {row['phi_out_k']:>12.3f}"
            )
        if compare["note"]:
            lines.append(f"note: {compare['note']}")
        for side, names in (
            ("only in the first", compare["only_first"]),
            ("only in the second", compare["only_second"]),
        ):
            if names:
                lines.append(f"{len(names)} updates {side}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if "right_size" in report:
        plan = report["right_size"]
        shrink = plan["parameters_after"] / plan["parameters_before"] if plan["parameters_before"] else 1.0
        lines.append(
            f"\nright-size ({plan['mode'].replace('_', ' ')}, keeping {plan['energy']:.2%} of each update's energy): "
            f"r={plan['r']}, {plan['parameters_after']:,} of {plan['parameters_before']:,} parameters ({shrink:.0%}), "
            f"relative error {plan['relative_error']:.2e}"
        )
        if "out" in plan:
            lines.append(f"truncated adapter written to {plan['out']}")
    return "\n".join(lines)
