"""Generic target-module strategies mapped onto each architecture's real module names, and the
seed article's search spaces and scenario recipes as data.

A strategy ("Q,V", "All attention", "FFN only", "All linear") names roles (see `lora_core.roles`);
`resolve_strategy` turns them into the shortest `target_modules` list that matches exactly those
modules under PEFT's suffix rule (e.g. GPT-2's `attn.c_proj` vs `mlp.c_proj`), or a regex when no
suffix list can (BERT's `output.dense` is a suffix of `attention.output.dense`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from lora_core.errors import InputError
from lora_core.models import Inventory
from lora_core.options import DTYPE_BYTES
from lora_core.roles import ATTENTION_ROLES, MLP_ROLES
from lora_core.settings import ALL_LINEAR, LoraSettings

if TYPE_CHECKING:
    from lora_core.counting import CountResult

STRATEGIES: dict[str, tuple[str, ...] | str] = {
    "Q,V": ("attn_q", "attn_v"),
    "All attention": ATTENTION_ROLES,
    "FFN only": MLP_ROLES,
    "All linear": ALL_LINEAR,
}
_ADAPTABLE = ("linear", "conv1d", "embedding", "conv")


class StrategyError(InputError):
    """A strategy this architecture's module names cannot express."""


@dataclass(frozen=True)
class StrategyTargets:
    """What a strategy becomes on one model: PEFT fields plus a human note (e.g. fused qkv)."""

    strategy: str
    target_modules: tuple[str, ...] | str
    target_parameters: tuple[str, ...] | None
    note: str = ""

    def apply(self, settings: LoraSettings) -> LoraSettings:
        """`settings` with these targets (pattern, layer and exclusion fields kept)."""
        return settings.replace(target_modules=self.target_modules, target_parameters=self.target_parameters)


def resolve_strategy(inv: Inventory, strategy: str) -> StrategyTargets:
    """The targets of `strategy` on `inv`'s model. Raises `StrategyError` when the model has no
    modules in the strategy's roles (e.g. "Q,V" on a model without attention projections)."""
    roles = STRATEGIES.get(strategy)
    if roles is None:
        raise StrategyError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if roles == ALL_LINEAR:
        return StrategyTargets(
            strategy, ALL_LINEAR, None, "every Linear/Conv1D layer except the output head (PEFT's rule)"
        )
    modules = inv.modules
    note = ""
    wanted = modules["role"].isin(roles) & modules["kind"].isin(_ADAPTABLE)
    if strategy == "Q,V" and not wanted.any() and (modules["role"] == "attn_qkv").any():
        wanted = modules["role"] == "attn_qkv"
        note = "q, k and v share one fused projection here, so Q,V adapts the fused qkv layer"
    params = modules[modules["role"].isin(roles) & (modules["kind"] == "param")]
    if not wanted.any() and params.empty:
        raise StrategyError(
            f"{inv.spec.model_id} has no modules in roles {', '.join(roles)}: '{strategy}' cannot be mapped"
        )
    chosen = modules.loc[wanted, "name"].tolist()
    target_parameters = tuple(sorted({n.rsplit(".", 1)[-1] for n in params["name"]})) or None
    if target_parameters:
        note = (note + "; " if note else "") + "fused MoE experts are reached through `target_parameters`"
    return StrategyTargets(strategy, minimal_targets(chosen, modules["name"].tolist()), target_parameters, note)


def settings_on_model(settings: LoraSettings, strategy: str | None, inv: Inventory) -> tuple[LoraSettings, str]:
    """`settings` with `strategy`'s targets in `inv`'s own module names, and the strategy's note on
    this model ("" when none). `strategy` None keeps the settings' own `target_modules` (a custom
    list, taken as written); every other field is kept as it is.

    Raises `StrategyError` when the strategy is unknown or has no modules on this model."""
    if strategy is None:
        return settings, ""
    targets = resolve_strategy(inv, strategy)
    return targets.apply(settings), targets.note


def minimal_targets(chosen: list[str], all_names: list[str]) -> tuple[str, ...] | str:
    """The shortest suffix list that PEFT matches to exactly `chosen` among `all_names`; a regex
    over digit-generalised names when no suffix list can single them out."""
    if not chosen:
        return ()
    chosen_set = set(chosen)
    # every dotted suffix of every other module: a suffix list matches exactly `chosen` when no
    # suffix in it is one of these (PEFT matches `name == key or name.endswith("." + key)`)
    taken: set[str] = set()
    for other in all_names:
        if other and other not in chosen_set:
            parts = other.split(".")
            taken.update(".".join(parts[-size:]) for size in range(1, len(parts) + 1))
    suffixes = set()
    for name in chosen:
        suffix = _unique_suffix(name, taken)
        if suffix is None:
            return _regex_for(chosen, all_names)
        suffixes.add(suffix)
    return tuple(sorted(suffixes))


def _unique_suffix(name: str, taken: set[str]) -> str | None:
    parts = name.split(".")
    for size in range(1, len(parts) + 1):
        if parts[-size].isdigit():
            return None
        suffix = ".".join(parts[-size:])
        if suffix not in taken:
            return suffix
    return None


def _regex_for(chosen: list[str], all_names: list[str]) -> str:
    # `encoder.layer.0.output.dense` -> `encoder\.layer\.\d+\.output\.dense`
    generalised = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in chosen})
    pattern = "|".join(generalised)
    if {n for n in all_names if re.fullmatch(pattern, n)} != set(chosen):
        pattern = "|".join(re.escape(n) for n in sorted(chosen))
    return pattern


# --- The seed article's data (In[21] recipes, In[26] search spaces) ------------------------------

ATTENTION_QV = ("q_proj", "v_proj")
ATTENTION_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SCENARIOS: dict[str, dict] = {
    "classification_small_data": {
        "settings": LoraSettings(r=8, lora_alpha=16, target_modules=ATTENTION_QV, lora_dropout=0.1),
        "strategy": "Q,V",
        "description": "Conservative config for limited data",
    },
    "instruction_tuning": {
        "settings": LoraSettings(r=16, lora_alpha=32, target_modules=ATTENTION_QKVO, lora_dropout=0.05),
        "strategy": "All attention",
        "description": "Balanced config for instruction following",
    },
    "domain_adaptation": {
        "settings": LoraSettings(r=32, lora_alpha=64, target_modules=ALL_PROJECTIONS, lora_dropout=0.05),
        "strategy": "All linear",
        "description": "High-capacity config for domain shift",
    },
    "code_generation": {
        "settings": LoraSettings(r=64, lora_alpha=128, target_modules=ALL_PROJECTIONS, lora_dropout=0.0),
        "strategy": "All linear",
        "description": "Maximum capacity for complex tasks",
    },
}

# Article In[26]: ranks x alpha/r ratios x target sets x dropouts.
SEARCH_SPACES: dict[str, dict] = {
    "efficiency": {"ranks": (8, 16), "alpha_ratios": (1, 2), "target_sets": (ATTENTION_QV,), "dropouts": (0.05,)},
    "balanced": {
        "ranks": (8, 16, 32),
        "alpha_ratios": (1, 2),
        "target_sets": (ATTENTION_QV, ATTENTION_QKVO),
        "dropouts": (0.0, 0.05, 0.1),
    },
    "thorough": {
        "ranks": (4, 8, 16, 32, 64),
        "alpha_ratios": (0.5, 1, 2),
        "target_sets": (ATTENTION_QV, ATTENTION_QKVO, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
        "dropouts": (0.0, 0.05, 0.1),
    },
}
# Keyed by set: `LoraSettings` sorts `target_modules`, so the article's order never reaches the lookup.
_TARGET_SET_STRATEGY = {frozenset(ATTENTION_QV): "Q,V", frozenset(ATTENTION_QKVO): "All attention"}


def search_space(priority: str) -> list[LoraSettings]:
    """The article's configurations for `priority` ("efficiency" 4, "balanced" 36, "thorough" 135),
    in the article's order, with Llama-style names (`q_proj`, ...); `adapt_to_model` maps them."""
    return [settings for _, settings in _search_space_entries(priority)]


def _search_space_entries(priority: str) -> list[tuple[str, LoraSettings]]:
    """`search_space` with each entry's target-set label in the article's order ("q+k+v+o"), which
    the settings cannot give back: `LoraSettings` sorts `target_modules`."""
    space = SEARCH_SPACES[priority]
    return [
        (
            "+".join(t.split("_")[0] for t in targets),
            LoraSettings(r=r, lora_alpha=int(r * ratio), target_modules=targets, lora_dropout=dropout),
        )
        for r, ratio, targets, dropout in itertools.product(
            space["ranks"], space["alpha_ratios"], space["target_sets"], space["dropouts"]
        )
    ]


def adapt_to_model(settings: LoraSettings, inv: Inventory) -> tuple[LoraSettings, str]:
    """Llama-style target names rewritten to this model's own names by role, so every recipe and
    search-space entry is countable on any model. Returns (settings, note)."""
    targets = settings.target_modules
    if not isinstance(targets, tuple):
        return settings, ""
    leaves = {n.rsplit(".", 1)[-1] for n in inv.modules["name"]}
    if set(targets) <= leaves:
        return settings, ""
    strategy = _TARGET_SET_STRATEGY.get(frozenset(targets))
    if strategy is None:
        roles = tuple(_LLAMA_ROLES[t] for t in targets if t in _LLAMA_ROLES)
        mapped = resolve_roles(inv, roles)
        return settings.replace(
            target_modules=mapped
        ), f"{', '.join(targets)} mapped by role to {inv.spec.model_id}'s names"
    on_model, _ = settings_on_model(settings, strategy, inv)
    return on_model, f"{', '.join(targets)} mapped to {strategy} on {inv.spec.model_id}"


_LLAMA_ROLES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_o",
    "gate_proj": "mlp_gate",
    "up_proj": "mlp_up",
    "down_proj": "mlp_down",
}


def resolve_roles(inv: Inventory, roles: tuple[str, ...]) -> tuple[str, ...] | str:
    """`target_modules` matching exactly the adaptable modules in `roles` (fused qkv stands in for
    q, k or v when the model has no separate ones). Raises `StrategyError` when none exist."""
    modules = inv.modules
    wanted_roles = set(roles)
    if wanted_roles & {"attn_q", "attn_k", "attn_v"} and not modules["role"].isin(("attn_q", "attn_k", "attn_v")).any():
        wanted_roles.add("attn_qkv")
    if wanted_roles & {"mlp_gate", "mlp_up"}:
        wanted_roles.add("mlp_gate_up")
    wanted = modules["role"].isin(wanted_roles) & modules["kind"].isin(_ADAPTABLE)
    if not wanted.any():
        raise StrategyError(f"{inv.spec.model_id} has no modules in roles {', '.join(sorted(roles))}")
    return minimal_targets(modules.loc[wanted, "name"].tolist(), modules["name"].tolist())


def compare_strategies(
    model, r: int = 16, lora_alpha: float | None = None, base: LoraSettings | None = None
) -> pd.DataFrame:
    """One row per strategy on `model`: targets, trainable parameters, percent, adapter size on
    disk (fp32 and fp16/bf16, MB), per-role parameters, and a note or the reason it cannot map."""
    from lora_core.counting import count_lora_params
    from lora_core.models import as_inventory

    inv = as_inventory(model)
    base = (base or LoraSettings()).replace(r=r, lora_alpha=r if lora_alpha is None else lora_alpha)
    rows = []
    for strategy in STRATEGIES:
        try:
            settings, note = settings_on_model(base, strategy, inv)
            result = count_lora_params(inv, settings)
        except InputError as error:  # a strategy this model cannot take: its row says why
            rows.append({"strategy": strategy, "error": str(error)})
            continue
        rows.append(strategy_row(strategy, settings, result, note))
    table = pd.DataFrame(rows)
    role_columns = [c for c in table.columns if c.startswith("role:")]
    table[role_columns] = table[role_columns].fillna(0).astype("int64")
    for column in ("targets", "note", "error"):
        table[column] = table.get(column, pd.Series(dtype=object)).fillna("")
    return table


def strategy_row(strategy: str, settings: LoraSettings, result: CountResult, note: str = "") -> dict:
    """One row of `compare_strategies`: `settings` (named `strategy`) counted as `result`."""
    by_role = result.modules.groupby("role")["params"].sum()
    return {
        "strategy": strategy,
        "targets": describe_targets(settings.target_modules, settings.target_parameters),
        "modules": len(result.modules),
        "trainable_params": result.trainable_params,
        "percent": result.percent_trainable,
        "size_fp32_mb": result.trainable_params * DTYPE_BYTES["fp32"] / 1e6,
        "size_16bit_mb": result.trainable_params * DTYPE_BYTES["bf16"] / 1e6,
        **{f"role:{role}": int(v) for role, v in by_role.items()},
        "note": note,
        "error": "",
    }


def count_search_space(model, priority: str = "balanced") -> pd.DataFrame:
    """The article's search space counted on `model`: one row per configuration with r, alpha,
    targets (mapped to the model's names), dropout, trainable parameters and percent."""
    from lora_core.counting import count_lora_params
    from lora_core.models import as_inventory

    inv = as_inventory(model)
    rows = []
    for index, (label, settings) in enumerate(_search_space_entries(priority)):
        adapted, note = adapt_to_model(settings, inv)
        result = count_lora_params(inv, adapted)
        rows.append(
            {
                "config": index,
                "r": adapted.r,
                "lora_alpha": adapted.lora_alpha,
                "target_set": label,
                "targets": describe_targets(adapted.target_modules, adapted.target_parameters),
                "lora_dropout": adapted.lora_dropout,
                "trainable_params": result.trainable_params,
                "percent": result.percent_trainable,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def describe_targets(target_modules, target_parameters=None) -> str:
    """A short human form of the target fields."""
    text = ", ".join(target_modules) if isinstance(target_modules, tuple) else str(target_modules)
    if target_parameters:
        text += (" + " if text else "") + "params: " + ", ".join(target_parameters)
    return text
