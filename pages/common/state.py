"""The state every page renders: the current model, its inventory, the LoRA settings the sidebar
describes and their count, handed to pages as one `Current`; and the way back, from settings (a
recipe, an import) to the sidebar values that show them.

It never imports torch: everything computed comes from `lora_core`.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

import lora_core
from lora_core import LoraSettings
from lora_core.errors import InputError
from lora_core.settings import parse_targets
from lora_core.strategies import STRATEGIES, StrategyError, resolve_strategy, settings_on_model
from pages.common.fields import CUSTOM, DEFAULT_MODEL, ENGINE_FIELDS, SIDEBAR_DEFAULTS, WIDGET_MAX, field_problem
from pages.common.links import load_link


@dataclass(frozen=True)
class Current:
    """What every page renders: the model, its inventory, the settings and their count (or why not)."""

    spec: lora_core.ModelSpec
    inventory: lora_core.Inventory
    settings: LoraSettings
    result: lora_core.CountResult | None
    error: str | None
    target_note: str


def init_state() -> None:
    """Defaults for a new session (kept across pages and reruns), then the link's values."""
    first_run = "lx_spec" not in st.session_state
    if first_run:
        st.session_state["lx_spec"] = lora_core.resolve_model(DEFAULT_MODEL)
    for key, value in {"lx_rank_pattern": {}, "lx_alpha_pattern": {}, "lx_layers": None}.items():
        st.session_state.setdefault(key, value)
    accepted = st.session_state.setdefault("lx_ok", dict(SIDEBAR_DEFAULTS))
    for key in SIDEBAR_DEFAULTS:
        st.session_state.setdefault(key, accepted[key])
    if first_run:
        load_link(st.query_params, st.session_state)
    _apply_pending()


def current() -> Current:
    """The state every page renders, with the count or the one-line reason there is none."""
    spec = st.session_state["lx_spec"]
    inv = lora_core.inventory(spec)
    settings, note = settings_from_state(inv)
    try:
        return Current(spec, inv, settings, lora_core.count_lora_params(inv, settings), None, note)
    except InputError as error:
        return Current(spec, inv, settings, None, str(error), note)


def sidebar_strategy() -> str | None:
    """The sidebar's target strategy (a name in `STRATEGIES`), or None for its custom targets."""
    strategy = st.session_state["lx_ok"]["lx_strategy"]
    return None if strategy == CUSTOM else strategy


def settings_from_state(inv: lora_core.Inventory) -> tuple[LoraSettings, str]:
    """The LoraSettings the sidebar describes on `inv`'s model (its accepted values), and a note
    about the targets (why there are none, when the strategy cannot map onto this model)."""
    ok = st.session_state["lx_ok"]
    base = LoraSettings(
        r=int(ok["lx_r"]),
        lora_alpha=float(ok["lx_alpha"]),
        lora_dropout=float(ok["lx_dropout"]),
        use_rslora=bool(ok["lx_rslora"]),
        use_dora=bool(ok["lx_dora"]),
        bias=ok["lx_bias"],
    )
    if base.lora_alpha == int(base.lora_alpha):
        base = base.replace(lora_alpha=int(base.lora_alpha))
    base = base.replace(
        rank_pattern=dict(st.session_state["lx_rank_pattern"]),
        alpha_pattern=dict(st.session_state["lx_alpha_pattern"]),
        layers_to_transform=st.session_state["lx_layers"],
    )
    strategy = sidebar_strategy()
    if strategy is None:
        base = base.replace(target_modules=parse_targets(ok["lx_custom_targets"]))
    try:
        return settings_on_model(base, strategy, inv)
    except StrategyError as error:
        return base.replace(target_modules=()), str(error)


def request_apply(changes: dict, page: str | None = None) -> None:
    """Ask the sidebar to take `changes` (widget keys -> values) on the next run, then rerun (on
    page file `page` when given).

    Widgets own their keys once drawn in a run, so a page cannot set them directly; the change is
    parked and applied before the sidebar draws.
    """
    st.session_state["lx_pending"] = changes
    if page is not None:
        st.switch_page(page)
    st.rerun()


def _apply_pending() -> None:
    pending = st.session_state.pop("lx_pending", None)
    if pending:
        for key, value in pending.items():
            st.session_state[key] = value


def apply_settings(settings: LoraSettings, inv: lora_core.Inventory) -> None:
    """Make the sidebar show `settings` (a recipe or a search-space row) and rerun."""
    try:
        changes, _ = sidebar_changes(settings, inv)
    except InputError as error:
        st.error(f"Not applied, the current settings are kept: {error}")
        return
    for key in ("lx_rank_pattern", "lx_alpha_pattern", "lx_layers"):  # a recipe leaves these as they are
        changes.pop(key)
    request_apply(changes)


def sidebar_changes(settings: LoraSettings, inv: lora_core.Inventory) -> tuple[dict, list[str]]:
    """The sidebar values (widget keys -> values) that show `settings` on `inv`'s model, and the
    fields of `settings` the sidebar has no place for (Apply leaves them out: say so first).

    Raises `InputError` (one line) for a value the sidebar cannot show as it is, e.g. r above the
    slider: nothing is ever clamped."""
    for key, value in (("lx_r", settings.r), ("lx_alpha", settings.lora_alpha), ("lx_dropout", settings.lora_dropout)):
        problem = field_problem(key, value)
        if problem and key in WIDGET_MAX and "maximum" in problem:
            problem = f"{ENGINE_FIELDS[key]}={value:g} is above the sidebar's maximum of {WIDGET_MAX[key]:g}"
        if problem:
            raise InputError(problem)
    if settings.target_modules is None:
        if settings.target_parameters:
            raise InputError(
                "the sidebar needs `target_modules`: this config adapts only `target_parameters`, which it cannot hold"
            )
        from lora_core.counting import normalised_peft_config

        config, problems = normalised_peft_config(inv, settings)  # PEFT's default targets for the model type
        if problems:
            raise InputError(problems[0])
        targets = config.target_modules
        settings = settings.replace(target_modules=targets if isinstance(targets, str) else tuple(targets))
    changes = {
        "lx_r": int(settings.r),
        "lx_alpha": float(settings.lora_alpha),
        "lx_dropout": float(settings.lora_dropout),
        "lx_rslora": settings.use_rslora,
        "lx_dora": settings.use_dora,
        "lx_bias": settings.bias,
        "lx_rank_pattern": dict(settings.rank_pattern),
        "lx_alpha_pattern": dict(settings.alpha_pattern),
        "lx_layers": (settings.layers_to_transform,)
        if isinstance(settings.layers_to_transform, int)
        else settings.layers_to_transform,
    }
    strategy = strategy_of(settings, inv)
    changes["lx_strategy"] = strategy or CUSTOM
    if strategy is None:
        changes["lx_custom_targets"] = targets_text(settings.target_modules)
    left_out = [
        name
        for name in ("exclude_modules", "target_parameters", "layers_pattern", "modules_to_save", "lora_bias")
        if getattr(settings, name)
    ]
    if settings.task_type not in (None, "CAUSAL_LM"):
        left_out.append(f"task_type={settings.task_type}")
    return changes, left_out + sorted(settings.peft_extras)


def strategy_of(settings: LoraSettings, inv: lora_core.Inventory) -> str | None:
    """The named strategy whose targets equal `settings`' on this model, if any."""
    for name in STRATEGIES:
        try:
            targets = resolve_strategy(inv, name)
        except StrategyError:
            continue
        if targets.target_modules == settings.target_modules and not targets.target_parameters:
            return name
    return None


def targets_text(targets) -> str:
    """The custom-targets text field's form of `target_modules`."""
    if isinstance(targets, tuple):
        return ", ".join(targets)
    if targets == "all-linear":
        return "all-linear"
    return f"re:{targets}"
