"""Shared UI state: the current model and LoRA settings every page reads.

Per-user state lives in `st.session_state` under `lx_*` keys; this module renders the sidebar that
edits it and hands pages one `Current` object. It never imports torch: everything computed comes
from `lora_core`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

import lora_core
from lora_core import LoraSettings, ModelResolutionError, simulate
from lora_core.guidelines import alpha_advice
from lora_core.runner import RunManager
from lora_core.store import Store, default_data_dir
from lora_core.strategies import STRATEGIES, StrategyError, describe_targets, resolve_strategy

DEFAULT_MODEL = "meta-llama/Llama-2-7b-hf"
CUSTOM = "Custom"
MAX_UPLOAD_MB = 1


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
    """Defaults for a new session (kept across pages and reruns)."""
    defaults = {
        "lx_spec": lora_core.resolve_model(DEFAULT_MODEL),
        "lx_catalogue_choice": DEFAULT_MODEL,
        "lx_r": 16,
        "lx_alpha": 32.0,
        "lx_dropout": 0.05,
        "lx_strategy": "All attention",
        "lx_custom_targets": "q_proj, v_proj",
        "lx_rslora": False,
        "lx_dora": False,
        "lx_bias": "none",
        "lx_rank_pattern": {},
        "lx_alpha_pattern": {},
        "lx_layers": None,
    }
    first_run = "lx_spec" not in st.session_state
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    if first_run:
        _load_query_params()
    _apply_pending()


# Shareable links: the URL carries the model and the settings (?model=...&r=...&alpha=...).
_URL_KEYS = {
    "r": ("lx_r", lambda v: _int_in(v, 1, 256)),
    "alpha": ("lx_alpha", lambda v: _float_in(v, 0.5, 4096)),
    "dropout": ("lx_dropout", lambda v: _float_in(v, 0.0, 0.5)),
    "targets": ("lx_strategy", lambda v: v if v in (*STRATEGIES, CUSTOM) else None),
    "custom": ("lx_custom_targets", lambda v: v if v.strip() else None),
    "rslora": ("lx_rslora", lambda v: {"1": True, "0": False}.get(v)),
    "dora": ("lx_dora", lambda v: {"1": True, "0": False}.get(v)),
    "bias": ("lx_bias", lambda v: v if v in ("none", "lora_only", "all") else None),
}


def _int_in(text: str, low: int, high: int) -> int | None:
    return _number_in(int, text, low, high)


def _float_in(text: str, low: float, high: float) -> float | None:
    return _number_in(float, text, low, high)


def _number_in(kind, text: str, low, high):
    """`text` as a `kind` within [low, high], else None (a bad or stale link value)."""
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def _load_query_params() -> None:
    """Take the model and settings from the URL; a bad or stale value keeps its default, with a notice."""
    params = st.query_params
    ignored = []
    model = params.get("model")
    if model:
        if model in lora_core.catalogue_ids():
            st.session_state["lx_spec"] = lora_core.resolve_model(model)
            st.session_state["lx_catalogue_choice"] = model
        else:
            ignored.append(f"model={model}")
    for name, (key, parse) in _URL_KEYS.items():
        if name in params:
            value = parse(params[name])
            if value is None:
                ignored.append(f"{name}={params[name]}")
            else:
                st.session_state[key] = value
    if ignored:
        st.session_state["lx_url_notice"] = (
            f"The link's {', '.join(ignored)} could not be used (unknown or out of range); defaults kept."
        )


def _sync_query_params() -> None:
    """Write the current model and settings into the URL so a copied link reopens this view."""
    state = st.session_state
    wanted = {
        "model": state["lx_spec"].model_id if state["lx_spec"].source == "catalogue" else None,
        "r": str(state["lx_r"]),
        "alpha": f"{float(state['lx_alpha']):g}",
        "dropout": f"{float(state['lx_dropout']):g}",
        "targets": state["lx_strategy"],
        "custom": state["lx_custom_targets"] if state["lx_strategy"] == CUSTOM else None,
        "rslora": "1" if state["lx_rslora"] else None,
        "dora": "1" if state["lx_dora"] else None,
        "bias": state["lx_bias"] if state["lx_bias"] != "none" else None,
    }
    for name, value in wanted.items():
        if value is None:
            if name in st.query_params:
                del st.query_params[name]
        elif st.query_params.get(name) != value:
            st.query_params[name] = value


def request_apply(changes: dict) -> None:
    """Ask the sidebar to take `changes` (widget keys -> values) on the next run, then rerun.

    Widgets own their keys once drawn in a run, so a page cannot set them directly; the change is
    parked and applied before the sidebar draws.
    """
    st.session_state["lx_pending"] = changes
    st.rerun()


def _apply_pending() -> None:
    pending = st.session_state.pop("lx_pending", None)
    if pending:
        for key, value in pending.items():
            st.session_state[key] = value


def apply_settings(settings: LoraSettings, inv: lora_core.Inventory) -> None:
    """Make the sidebar show `settings` (a recipe or a search-space row) and rerun."""
    changes = {
        "lx_r": int(settings.r),
        "lx_alpha": float(settings.lora_alpha),
        "lx_dropout": float(settings.lora_dropout),
        "lx_rslora": settings.use_rslora,
        "lx_dora": settings.use_dora,
        "lx_bias": settings.bias,
    }
    strategy = strategy_of(settings, inv)
    changes["lx_strategy"] = strategy or CUSTOM
    if strategy is None:
        changes["lx_custom_targets"] = targets_text(settings.target_modules)
    request_apply(changes)


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


def render_sidebar() -> None:
    """The model picker and the LoRA settings, in the sidebar of every page."""
    with st.sidebar:
        st.subheader("Model")
        _model_picker()
        st.subheader("LoRA settings")
        st.slider("Rank r", 1, 256, key="lx_r", help="LoRA rank: lora_A is r x in, lora_B is out x r")
        st.number_input("Alpha (lora_alpha)", min_value=0.5, max_value=4096.0, step=1.0, key="lx_alpha")
        st.slider("Dropout (lora_dropout)", 0.0, 0.5, step=0.01, key="lx_dropout")
        st.selectbox("Target modules", [*STRATEGIES, CUSTOM], key="lx_strategy")
        if st.session_state["lx_strategy"] == CUSTOM:
            st.text_input(
                "Custom targets",
                key="lx_custom_targets",
                help="comma-separated names (q_proj, v_proj), 'all-linear', or re:REGEX for a regex",
            )
        st.toggle("rsLoRA (alpha / sqrt(r))", key="lx_rslora")
        st.toggle("DoRA", key="lx_dora")
        st.selectbox("Bias", ["none", "lora_only", "all"], key="lx_bias")
        if st.session_state.get("lx_url_notice"):
            st.warning(st.session_state["lx_url_notice"])
        _sync_query_params()
        _sidebar_download()


def _sidebar_download() -> None:
    """The current settings as a PEFT adapter_config.json, one click from every page."""
    from lora_core.export import export

    state = current()
    if state.error:
        return
    st.download_button(
        "Download adapter_config.json",
        export(state.settings, state.inventory, "peft"),
        file_name="adapter_config.json",
        mime="application/json",
        key="lx_sidebar_download",
    )


def _model_picker() -> None:
    source = st.radio(
        "Source", ["Catalogue", "Hub id or path", "Upload config.json"], horizontal=False, key="lx_source"
    )
    if source == "Catalogue":
        choice = st.selectbox("Catalogue model", lora_core.catalogue_ids(), key="lx_catalogue_choice")
        if choice != st.session_state["lx_spec"].model_id:
            st.session_state["lx_spec"] = lora_core.resolve_model(choice)
    elif source == "Hub id or path":
        name = st.text_input("Hub id, model folder or config.json path", key="lx_model_text")
        if st.button("Load model", key="lx_load") and name:
            _try_set_model(lambda: lora_core.resolve_model(name))
    else:
        upload = st.file_uploader("config.json", type=["json"], key="lx_upload", max_upload_size=MAX_UPLOAD_MB)
        if upload is not None and upload.file_id != st.session_state.get("lx_upload_seen"):
            st.session_state["lx_upload_seen"] = upload.file_id
            _try_set_model(lambda: lora_core.spec_from_text(upload.getvalue(), upload.name))
    if st.session_state.get("lx_model_error"):
        st.error(st.session_state["lx_model_error"])
    st.caption(f"Current: **{st.session_state['lx_spec'].model_id}**")


def _try_set_model(load) -> None:
    """Switch model only when the new one resolves and builds; otherwise keep the current one."""
    try:
        spec = load()
        lora_core.inventory(spec)
    except ModelResolutionError as error:
        st.session_state["lx_model_error"] = f"{error} (keeping {st.session_state['lx_spec'].model_id})"
        return
    st.session_state["lx_model_error"] = None
    st.session_state["lx_spec"] = spec


def settings_from_state(inv: lora_core.Inventory) -> tuple[LoraSettings, str]:
    """The LoraSettings the sidebar describes on `inv`'s model, and a note about the targets."""
    base = LoraSettings(
        r=int(st.session_state["lx_r"]),
        lora_alpha=float(st.session_state["lx_alpha"]),
        lora_dropout=float(st.session_state["lx_dropout"]),
        use_rslora=bool(st.session_state["lx_rslora"]),
        use_dora=bool(st.session_state["lx_dora"]),
        bias=st.session_state["lx_bias"],
    )
    if base.lora_alpha == int(base.lora_alpha):
        base = base.replace(lora_alpha=int(base.lora_alpha))
    base = base.replace(
        rank_pattern=dict(st.session_state["lx_rank_pattern"]),
        alpha_pattern=dict(st.session_state["lx_alpha_pattern"]),
        layers_to_transform=st.session_state["lx_layers"],
    )
    strategy = st.session_state["lx_strategy"]
    if strategy == CUSTOM:
        return base.replace(target_modules=parse_targets(st.session_state["lx_custom_targets"])), ""
    try:
        targets = resolve_strategy(inv, strategy)
    except StrategyError as error:
        return base.replace(target_modules=()), str(error)
    return targets.apply(base), targets.note


def parse_targets(text: str) -> tuple[str, ...] | str:
    """`q_proj, v_proj` -> a list; `all-linear` as is; `re:...` -> a regex string."""
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    if text.lower() == "all-linear":
        return "all-linear"
    return tuple(part.strip() for part in text.split(",") if part.strip())


def page_state() -> Current:
    """`current()` for a page file. The first run in a fresh server can reach a page file directly
    (Streamlit's legacy pages/ folder dispatch, before app.py's `st.navigation` has run once, e.g.
    a shared link to /memory): that run hands over to app.py, whose navigation then serves the same
    URL; should the hand-over not happen, the page sets up the shared state and sidebar itself."""
    if "lx_spec" not in st.session_state:
        from streamlit.runtime.pages_manager import PagesManager

        if PagesManager.uses_pages_directory:
            # What `st.navigation` sets once it runs: every run after this one executes app.py
            PagesManager.uses_pages_directory = False
            st.rerun()
        init_state()
        render_sidebar()
    return current()


def current() -> Current:
    """The state every page renders, with the count or the one-line reason there is none."""
    spec = st.session_state["lx_spec"]
    inv = lora_core.inventory(spec)
    settings, note = settings_from_state(inv)
    try:
        return Current(spec, inv, settings, lora_core.count_lora_params(inv, settings), None, note)
    except ValueError as error:
        return Current(spec, inv, settings, None, str(error), note)


def show_count(state: Current) -> None:
    """The headline numbers for the current config, or the validation error."""
    if state.error:
        st.error(state.error)
        return
    result = state.result
    cols = st.columns(4)
    cols[0].metric("Trainable parameters", f"{result.trainable_params:,}")
    cols[1].metric("% of all parameters", f"{result.percent_trainable:.4f}%")
    cols[2].metric("Adapted modules", f"{len(result.modules):,}")
    cols[3].metric("Adapter size (bf16)", f"{result.trainable_params * 2 / 1e6:,.1f} MB")
    st.caption(f"Targets: `{describe_targets(state.settings.target_modules, state.settings.target_parameters)}`")
    if state.target_note:
        st.caption(state.target_note)
    for warning in result.warnings:
        st.warning(warning)
    advice = alpha_advice(state.settings)
    if advice:
        st.warning(advice)


def run_manager() -> RunManager:
    """The process-wide training queue over the run store ($LORA_EXPLORER_DATA or the user data dir)."""
    return _run_manager(str(default_data_dir()))


@st.cache_resource
def _run_manager(data_dir: str) -> RunManager:
    return RunManager(Store.open(data_dir))


@st.cache_resource
def simulation_device() -> str:
    """The device simulations run on (CUDA, then MPS, then CPU), named for people."""
    return simulate.device_description()


@st.cache_resource
def rank_sweep_device() -> str:
    """The device the rank simulation runs on (as `simulation_device`, but the CPU for MPS, which
    has no float64), named for people."""
    return simulate.device_description(simulate.rank_sweep_device())


def role_breakdown(result: lora_core.CountResult) -> pd.DataFrame:
    """Per-role sums of the per-module table."""
    return (
        result.modules.groupby("role", as_index=False)
        .agg(modules=("name", "size"), params=("params", "sum"))
        .sort_values("params", ascending=False)
    )


def human(count: int) -> str:
    """1234567 -> '1.23M'."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.2f}{suffix}"
    return str(count)


# Reference lines and bands as plain layout dicts, added in one `update_layout`: plotly's
# add_vline/add_vrect validate every shape against every subplot, ~20 ms each per rerun.
def vline(x: float, text: str, position: str = "bottom right") -> tuple[dict, dict]:
    """A dotted vertical line across the plot at `x`, and its label."""
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1}
    shape["line"] = {"dash": "dot", "width": 1.5, "color": "#444"}
    return shape, _label(x, "x", text, position)


def hline(y: float, text: str, position: str = "top right") -> tuple[dict, dict]:
    """A dotted horizontal line across the plot at `y`, and its label."""
    shape = {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": y, "y1": y}
    shape["line"] = {"dash": "dot", "width": 1.5, "color": "#444"}
    return shape, _label(y, "y", text, position)


def vband(x0: float, x1: float, text: str) -> tuple[dict, dict]:
    """A faint shaded band between `x0` and `x1`, labelled at its top left."""
    shape = {"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1}
    shape |= {"fillcolor": "#636efa", "opacity": 0.08, "line": {"width": 0}, "layer": "below"}
    return shape, _label(x0, "x", text, "top left")


def _label(at: float, axis: str, text: str, position: str) -> dict:
    vertical, horizontal = position.split()
    if axis == "x":
        label = {"x": at, "xref": "x", "yref": "paper", "y": 1 if vertical == "top" else 0}
        label |= {"xanchor": "left" if horizontal == "right" else "right", "yanchor": vertical}
        if horizontal == "left" and vertical == "top":  # a band's label sits inside it
            label["xanchor"] = "left"
    else:
        label = {"y": at, "yref": "y", "xref": "paper", "x": 1 if horizontal == "right" else 0}
        label |= {"xanchor": horizontal, "yanchor": "bottom" if vertical == "top" else "top"}
    return label | {"text": text, "showarrow": False}


def add_markers(figure, *markers: tuple[dict, dict]) -> None:
    """Add `vline`/`hline`/`vband` markers to `figure` in one layout update."""
    figure.update_layout(
        shapes=[*figure.layout.shapes, *(shape for shape, _ in markers)],
        annotations=[*figure.layout.annotations, *(label for _, label in markers)],
    )
