"""An experiment's grid: which LoRA and training values its trials take, parsed from text
(`--grid "r=4,16"`, the page's fields) or from one of the article's search spaces, and expanded
into trials on one model.

A grid maps a dimension to its values. Values of `targets` are separated by `|` (a strategy name
such as "Q,V" holds a comma); every other dimension takes `,` or `|`. Every dimension not in
the grid keeps the experiment's base settings and config.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_core.embedded import config_name
from lora_core.errors import InputError, short_repr
from lora_core.settings import ALL_LINEAR, MAX_RANK, MAX_REGEX_CHARS, LoraSettings
from lora_core.strategies import SEARCH_SPACES, STRATEGIES
from lora_core.training.config import TrainConfig

# More trials than anyone runs as "short runs" on one machine; a typo such as r=1..1000 is refused.
MAX_TRIALS = 512
MAX_SEEDS = 10
# The embedded SmolLM2-135M-Instruct has the architecture and shapes of this catalogue config.

# PEFT's `init_lora_weights` values a short run can use on any model: "eva" and "corda" need a
# data pass before training, and "loftq" a quantized model, which short runs do not do.
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "mica")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9]\d{0,3})")
# Inits that rewrite the base layer's weight (the residual of the adapter's start), which must be
# restored before the next trial on the same loaded model.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

_ALIASES = {
    "targets": "targets",
    "target_modules": "targets",
    "strategy": "targets",
    "r": "r",
    "rank": "r",
    "alpha": "alpha",
    "lora_alpha": "alpha",
    "lr": "lr",
    "learning_rate": "lr",
    "dropout": "dropout",
    "lora_dropout": "dropout",
    "rslora": "rslora",
    "use_rslora": "rslora",
    "dora": "dora",
    "use_dora": "dora",
    "loraplus": "loraplus",
    "loraplus_lr_ratio": "loraplus",
    "init": "init",
    "init_lora_weights": "init",
}
# Canonical dimensions in the order trials vary (the last fastest) and the page shows them.
DIMENSIONS = ("targets", "r", "alpha", "lr", "dropout", "rslora", "dora", "loraplus", "init")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
Grid = dict[str, tuple[Any, ...]]


class GridError(InputError):
    """A grid that cannot be run; the message names the dimension and the value."""


@dataclass(frozen=True)
class Trial:
    """One point of the grid on one model: its values by dimension (with "seed"), and the settings
    and config it trains with."""

    index: int
    values: Mapping[str, Any]
    settings: LoraSettings
    config: TrainConfig
    note: str = ""
    label: str = field(default="", compare=False)


def parse_grid(items: Iterable[str]) -> Grid:
    """`["targets=Q,V|All linear", "r=4,16"]` as a grid. Raises `GridError` in one line that names
    the item and what is wrong with it."""
    grid: Grid = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise GridError(f"grid item {short_repr(item)}: write NAME=V1,V2 (names: {', '.join(DIMENSIONS)})")
        raw_name, _, text = item.partition("=")
        name = _ALIASES.get(raw_name.strip().lower())
        if name is None:
            raise GridError(
                f"grid item {short_repr(item)}: unknown name {raw_name.strip()!r}; use one of {', '.join(DIMENSIONS)}"
            )
        if name in grid:
            raise GridError(f"grid item {short_repr(item)}: {name} is given twice; put all its values in one item")
        separator = "|" if name == "targets" or "|" in text else ","
        values = [value.strip() for value in text.split(separator)]
        if not text.strip() or any(not value for value in values):
            raise GridError(f"grid item {short_repr(item)}: an empty value; separate values with {separator!r}")
        grid[name] = tuple(dict.fromkeys(parse_value(name, value) for value in values))
    return grid


def parse_value(name: str, text: str) -> Any:
    """One value of dimension `name` from its text; raises `GridError`."""
    try:
        return _PARSERS[name](text)
    except GridError as error:
        raise GridError(f"{name}={text}: {error}") from None
    except (ValueError, OverflowError):
        raise GridError(f"{name}={short_repr(text)}: {_EXPECTED[name]}") from None


def _targets(text: str) -> str:
    if text in STRATEGIES or text == ALL_LINEAR:
        return text
    if text.startswith("re:"):
        pattern = text[3:].strip()
        if not pattern or len(pattern) > MAX_REGEX_CHARS:
            raise GridError(f"a regex of 1 to {MAX_REGEX_CHARS} characters after re:")
        try:
            re.compile(pattern)
        except re.error as error:
            raise GridError(f"invalid regex ({error})") from None
        return f"re:{pattern}"
    names = [part.strip() for part in re.split(r"[+,]", text)]
    if not all(re.fullmatch(r"[A-Za-z_][\w.\-]{0,200}", n) for n in names):
        raise GridError(f"{_EXPECTED['targets']}; got {short_repr(text)}")
    return "+".join(sorted(set(names)))


def _rank(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_RANK:
        raise GridError(f"a rank from 1 to {MAX_RANK}")
    return value


def _alpha(text: str) -> float | str:
    """A number, or "<k>r" / "r": alpha as a multiple of each trial's rank (the article's alpha/r)."""
    lowered = text.lower().replace(" ", "").replace("*", "")
    if lowered.endswith("r"):
        factor = float(lowered[:-1] or "1")
        if not (math.isfinite(factor) and 0 < factor <= 1024):
            raise GridError("alpha as a multiple of r needs a factor in (0, 1024], such as 2r")
        return f"{factor:g}r"
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1e6):
        raise GridError("alpha must be > 0 (or a multiple of r, such as 2r)")
    return value


def _learning_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise GridError("a learning rate in (0, 1), such as 2e-4")
    return value


def _dropout(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise GridError("a dropout in [0, 1), such as 0.05")
    return value


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise GridError("true or false")


def _loraplus(text: str) -> float | None:
    """LoRA+'s learning-rate ratio of B to A, or None (off)."""
    if text.lower() in ("off", "none", "no", "false"):
        return None
    value = float(text)
    if not (math.isfinite(value) and 1 <= value <= 1024):
        raise GridError("a LoRA+ ratio from 1 to 1024 (the paper uses 16), or off")
    return value


def _init(text: str) -> str:
    lowered = text.lower()
    if lowered in ("true", "kaiming"):
        return "default"
    if lowered in INITS or _PISSA_NITER.fullmatch(lowered):
        return lowered
    if lowered in ("eva", "corda", "loftq", "lora_ga"):
        raise GridError(f"{lowered} needs a data pass or a quantized model first; short runs take {', '.join(INITS)}")
    raise GridError(f"one of {', '.join(INITS)} or pissa_niter_N")


_PARSERS = {
    "targets": _targets,
    "r": _rank,
    "alpha": _alpha,
    "lr": _learning_rate,
    "dropout": _dropout,
    "rslora": _flag,
    "dora": _flag,
    "loraplus": _loraplus,
    "init": _init,
}
_EXPECTED = {
    "targets": f"a strategy ({', '.join(STRATEGIES)}), all-linear, modules joined by + (q_proj+v_proj) or re:REGEX",
    "r": f"a whole rank from 1 to {MAX_RANK}",
    "alpha": "a number > 0 or a multiple of r such as 2r",
    "lr": "a learning rate in (0, 1), such as 2e-4",
    "dropout": "a dropout in [0, 1), such as 0.05",
    "rslora": "true or false",
    "dora": "true or false",
    "loraplus": "a LoRA+ ratio from 1 to 1024, or off",
    "init": f"one of {', '.join(INITS)}",
}


def space_grid(space: str) -> Grid:
    """The article's search space `space` (efficiency / balanced / thorough) as a grid: the same
    ranks, alpha/r ratios, target sets and dropouts, in the article's order."""
    if space not in SEARCH_SPACES:
        raise GridError(f"unknown search space {space!r}; use one of {', '.join(SEARCH_SPACES)}")
    spec = SEARCH_SPACES[space]
    named = {("q_proj", "v_proj"): "Q,V", ("q_proj", "k_proj", "v_proj", "o_proj"): "All attention"}
    return {
        "targets": tuple(named.get(tuple(t), "+".join(sorted(t))) for t in spec["target_sets"]),
        "r": tuple(spec["ranks"]),
        "alpha": tuple(f"{ratio:g}r" for ratio in spec["alpha_ratios"]),
        "dropout": tuple(spec["dropouts"]),
    }


def grid_size(grid: Mapping[str, Sequence[Any]], seeds: int = 1) -> int:
    return math.prod(len(values) for values in grid.values()) * seeds


def expand(
    grid: Mapping[str, Sequence[Any]],
    base_settings: LoraSettings,
    base_config: TrainConfig,
    seeds: int = 1,
    model_spec: str | None = None,
) -> list[Trial]:
    """Every combination of `grid` (last dimension fastest) times `seeds` repeats (seed 0, 1, ...
    added to the base config's seed), as trials. Target strategies and Llama-style module names
    are mapped onto the model's own module names (its config, no weights). Raises `GridError` for
    an empty or too large grid, or a combination the model or PEFT refuses."""
    from lora_core.errors import is_int

    if not is_int(seeds) or not 1 <= seeds <= MAX_SEEDS:
        raise GridError(f"seeds must be a whole number from 1 to {MAX_SEEDS}, got {short_repr(seeds)}")
    unknown = [name for name in grid if name not in DIMENSIONS]
    if unknown:
        raise GridError(f"unknown grid dimension {unknown[0]!r}; use one of {', '.join(DIMENSIONS)}")
    if any(not values for values in grid.values()):
        raise GridError("every grid dimension needs at least one value")
    total = grid_size(grid, seeds)
    if total > MAX_TRIALS:
        raise GridError(f"{total:,} trials is more than {MAX_TRIALS}: take fewer values or seeds")
    inventory = None
    if "targets" in grid:
        inventory = _inventory(model_spec or config_name(base_config.model))
    names = [name for name in DIMENSIONS if name in grid]
    trials: list[Trial] = []
    for combination in itertools.product(*(grid[name] for name in names)):
        values = dict(zip(names, combination, strict=True))
        settings, config, note = _apply(values, base_settings, base_config, inventory)
        for repeat in range(seeds):
            seeded = config if seeds == 1 else _replace(config, seed=config.seed + repeat)
            trial_values = {**values, "seed": seeded.seed}
            label = trial_label(trial_values if seeds > 1 else values)
            trials.append(Trial(len(trials), trial_values, settings, seeded, note, label))
    return trials


def trial_label(values: Mapping[str, Any]) -> str:
    """ "All linear r=16 alpha=2r lr=0.001 seed=1": a trial's values, short."""
    parts: list[str] = []
    for name, value in values.items():
        if name == "targets":
            parts.insert(0, str(value))
        elif isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        elif value is None:
            parts.append(f"{name}=off")
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)


def _apply(
    values: Mapping[str, Any], settings: LoraSettings, config: TrainConfig, inventory
) -> tuple[LoraSettings, TrainConfig, str]:
    changes: dict[str, Any] = {}
    note = ""
    if "r" in values:
        changes["r"] = values["r"]
    rank = changes.get("r", settings.r)
    if "alpha" in values:
        alpha = values["alpha"]
        changes["lora_alpha"] = rank * float(alpha[:-1]) if isinstance(alpha, str) else alpha
    elif "r" in values and settings.lora_alpha == settings.r:
        changes["lora_alpha"] = rank  # the base's alpha = r stays alpha = r
    if "dropout" in values:
        changes["lora_dropout"] = values["dropout"]
    if "rslora" in values:
        changes["use_rslora"] = values["rslora"]
    if "dora" in values:
        changes["use_dora"] = values["dora"]
    if "init" in values:
        extras = dict(settings.peft_extras)
        init = values["init"]
        if init == "default":
            extras.pop("init_lora_weights", None)
        else:
            extras["init_lora_weights"] = init
        changes["peft_extras"] = extras
    if changes:
        settings = settings.replace(**changes)
    if "targets" in values:
        settings, note = _with_targets(settings, values["targets"], inventory)
    config_changes: dict[str, Any] = {}
    if "lr" in values:
        config_changes["learning_rate"] = values["lr"]
    if "loraplus" in values:
        config_changes["loraplus_ratio"] = values["loraplus"]
    if config_changes:
        config = _replace(config, **config_changes)
    problems = settings.problems() + _init_problems(settings)
    if problems:
        raise GridError(f"trial {trial_label(values)}: {problems[0]}")
    return settings, config, note


def _init_problems(settings: LoraSettings) -> list[str]:
    """What PEFT refuses only when it builds the adapter: orthogonal init splits one orthogonal
    matrix between A and B, so it needs an even rank."""
    init = settings.peft_extras.get("init_lora_weights")
    if init == "orthogonal" and (settings.r % 2 or any(r % 2 for r in settings.rank_pattern.values())):
        return [f"init=orthogonal needs an even rank, got r={settings.r}"]
    return []


def _with_targets(settings: LoraSettings, target: str, inventory) -> tuple[LoraSettings, str]:
    from lora_core.strategies import adapt_to_model, settings_on_model

    if target in STRATEGIES:
        try:
            return settings_on_model(settings, target, inventory)
        except InputError as error:
            raise GridError(f"targets={target}: {error}") from None
    if target == ALL_LINEAR:
        return settings.replace(target_modules=ALL_LINEAR), ""
    if target.startswith("re:"):
        return settings.replace(target_modules=target[3:]), ""
    adapted, note = adapt_to_model(settings.replace(target_modules=tuple(target.split("+"))), inventory)
    leaves = {name.rsplit(".", 1)[-1] for name in inventory.modules["name"]}
    if isinstance(adapted.target_modules, tuple) and not set(adapted.target_modules) & leaves:
        raise GridError(f"targets={target}: {inventory.spec.model_id} has no such modules")
    return adapted, note


def _replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _inventory(name: str):
    import lora_core
    from lora_core.models import local_model_roots

    return lora_core.inventory(lora_core.resolve_model(name, local_roots=local_model_roots()))
