"""Shared UI state: the current model and LoRA settings every page reads.

Per-user state lives in `st.session_state` under `lx_*` keys; this module renders the sidebar that
edits it and hands pages one `Current` object. It never imports torch: everything computed comes
from `lora_core`.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd
import streamlit as st

import lora_core
from lora_core import LoraSettings, simulate
from lora_core.datasets import MAX_UPLOAD_BYTES
from lora_core.errors import InputError
from lora_core.guidelines import alpha_advice
from lora_core.models import MAX_CONFIG_BYTES, local_model_roots
from lora_core.runner import RunManager
from lora_core.settings import parse_targets
from lora_core.store import Store, default_data_dir
from lora_core.strategies import STRATEGIES, StrategyError, describe_targets, resolve_strategy

DEFAULT_MODEL = "meta-llama/Llama-2-7b-hf"
CUSTOM = "Custom"
# The sliders' tops. The engine takes r up to 65,536 and dropout in [0, 1); a rank slider that wide
# would be unusable, so an imported r above 256 is refused with a message, never clamped.
R_MAX = 256
DROPOUT_MAX = 0.99
IMPORT_MAX_BYTES = 1_000_000  # an adapter_config.json or a full JSON export

# What the sidebar edits, with each new session's value. `lx_ok` holds the last value of each that
# the engine accepted: the settings are built from it, so a bad value in a field shows one error
# under that field and changes nothing else, and a widget whose value a failed run dropped comes
# back from it (nothing the user set is lost).
SIDEBAR_DEFAULTS = {
    "lx_source": "Catalogue",
    "lx_catalogue_choice": DEFAULT_MODEL,
    "lx_model_text": "",
    "lx_r": 16,
    "lx_alpha": 32.0,
    "lx_dropout": 0.05,
    "lx_strategy": "All attention",
    "lx_custom_targets": "q_proj, v_proj",
    "lx_rslora": False,
    "lx_dora": False,
    "lx_bias": "none",
}
# Sidebar fields checked by the engine (LoraSettings field) and by their widget's range.
_ENGINE_FIELDS = {"lx_r": "r", "lx_alpha": "lora_alpha", "lx_dropout": "lora_dropout"}
_ENGINE_FIELDS["lx_custom_targets"] = "target_modules"
_WIDGET_MAX = {"lx_r": R_MAX, "lx_dropout": DROPOUT_MAX}


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
    first_run = "lx_spec" not in st.session_state
    if first_run:
        st.session_state["lx_spec"] = lora_core.resolve_model(DEFAULT_MODEL)
    for key, value in {"lx_rank_pattern": {}, "lx_alpha_pattern": {}, "lx_layers": None}.items():
        st.session_state.setdefault(key, value)
    accepted = st.session_state.setdefault("lx_ok", dict(SIDEBAR_DEFAULTS))
    for key in SIDEBAR_DEFAULTS:
        st.session_state.setdefault(key, accepted[key])
    if first_run:
        _load_query_params()
    _apply_pending()


def field_problem(key: str, value) -> str | None:
    """Why sidebar field `key` cannot take `value`, in one line (the engine's check, then the
    widget's range); None when it can."""
    if key not in _ENGINE_FIELDS:
        return None
    if key == "lx_custom_targets":
        if not isinstance(value, str):
            return "custom targets must be text"
        value = parse_targets(value)
    try:
        problems = LoraSettings(**{_ENGINE_FIELDS[key]: value}).problems()
    except InputError as error:
        return str(error)
    if problems:
        return problems[0]
    if key in _WIDGET_MAX and value > _WIDGET_MAX[key]:
        return f"`{_ENGINE_FIELDS[key]}` = {value:g} is above the sidebar's maximum of {_WIDGET_MAX[key]:g}"
    return None


# Shareable links: the URL carries the model and the settings (?model=...&r=...&alpha=...). Each
# value is parsed here, then checked like a sidebar entry (`field_problem`).
_URL_KEYS = {
    "r": ("lx_r", lambda v: _number(int, v)),
    "alpha": ("lx_alpha", lambda v: _number(float, v)),
    "dropout": ("lx_dropout", lambda v: _number(float, v)),
    "targets": ("lx_strategy", lambda v: v if v in (*STRATEGIES, CUSTOM) else None),
    "custom": ("lx_custom_targets", lambda v: v if v.strip() else None),
    "rslora": ("lx_rslora", lambda v: {"1": True, "0": False}.get(v)),
    "dora": ("lx_dora", lambda v: {"1": True, "0": False}.get(v)),
    "bias": ("lx_bias", lambda v: v if v in ("none", "lora_only", "all") else None),
}


def _number(kind, text: str):
    """`text` as a `kind`, else None (a bad or stale link value)."""
    try:
        return kind(text)
    except (ValueError, OverflowError):
        return None


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
            ignored.append(f"model={_shorten(model)}")
    for name, (key, parse) in _URL_KEYS.items():
        if name in params:
            value = parse(params[name])
            if value is None or field_problem(key, value):
                ignored.append(f"{name}={_shorten(params[name])}")
            else:
                st.session_state[key] = value
    if ignored:
        st.session_state["lx_url_notice"] = (
            f"The link's {', '.join(ignored)} could not be used (unknown or out of range); defaults kept."
        )


def _shorten(text: str, limit: int = 60) -> str:
    """A link value for the notice: without control characters, at most `limit` characters."""
    text = _clean(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sync_query_params() -> None:
    """Write the current model and settings into the URL so a copied link reopens this view."""
    state = st.session_state["lx_ok"]
    spec = st.session_state["lx_spec"]
    wanted = {
        "model": spec.model_id if spec.source == "catalogue" else None,
        "r": str(state["lx_r"]),
        "alpha": _link_float(state["lx_alpha"]),
        "dropout": _link_float(state["lx_dropout"]),
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


def _link_float(value) -> str:
    """A float for the URL: short (`32`), unless that would change it."""
    value = float(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


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
        if problem and key in _WIDGET_MAX and "maximum" in problem:
            problem = f"{_ENGINE_FIELDS[key]}={value:g} is above the sidebar's maximum of {_WIDGET_MAX[key]:g}"
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


def render_sidebar() -> None:
    """The model picker and the LoRA settings, in the sidebar of every page."""
    with st.sidebar:
        st.subheader("Model")
        _model_picker()
        st.subheader("LoRA settings")
        st.slider("Rank r", 1, R_MAX, key="lx_r", help="LoRA rank: lora_A is r x in, lora_B is out x r")
        _accept("lx_r")
        st.number_input(
            "Alpha (lora_alpha)",
            min_value=None,
            max_value=None,
            step=1.0,
            format="%g",
            key="lx_alpha",
            help="any number > 0",
        )
        _accept("lx_alpha")
        st.slider("Dropout (lora_dropout)", 0.0, DROPOUT_MAX, step=0.01, key="lx_dropout")
        _accept("lx_dropout")
        st.selectbox("Target modules", [*STRATEGIES, CUSTOM], key="lx_strategy")
        if st.session_state["lx_strategy"] == CUSTOM:
            st.text_input(
                "Custom targets",
                key="lx_custom_targets",
                help="comma-separated names (q_proj, v_proj), 'all-linear', or re:REGEX for a regex",
            )
            _accept("lx_custom_targets")
        st.toggle("rsLoRA (alpha / sqrt(r))", key="lx_rslora")
        st.toggle("DoRA", key="lx_dora")
        st.selectbox("Bias", ["none", "lora_only", "all"], key="lx_bias")
        for key in SIDEBAR_DEFAULTS.keys() - _ENGINE_FIELDS.keys():
            if key in st.session_state:  # widgets whose every value is valid: taken as they are
                st.session_state["lx_ok"][key] = st.session_state[key]
        if st.session_state.get("lx_url_notice"):
            st.warning(st.session_state["lx_url_notice"])
        _sync_query_params()
        _sidebar_download()


def _accept(key: str) -> None:
    """Take the value of sidebar field `key` into the settings when the engine accepts it; else
    say why, in one line under the field, and keep using the last accepted value."""
    value = st.session_state[key]
    problem = field_problem(key, value)
    if problem is None:
        st.session_state["lx_ok"][key] = value
        return
    kept = st.session_state["lx_ok"][key]
    st.error(f"{problem}: still using {kept:g}" if isinstance(kept, float) else f"{problem}: still using {kept}")


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
            _try_set_model(lambda: lora_core.resolve_model(choice))
    elif source == "Hub id or path":
        name = st.text_input("Hub id, model folder or config.json path", key="lx_model_text")
        if st.button("Load model", key="lx_load"):
            # the server's policy for local paths ($LORA_EXPLORER_MODEL_ROOTS): outside it, one answer
            _try_set_model(lambda: lora_core.resolve_model(name, local_roots=local_model_roots()))
    else:
        upload = file_upload("config.json", "lx_upload")
        if upload is not None and upload.file_id != st.session_state.get("lx_upload_seen"):
            st.session_state["lx_upload_seen"] = upload.file_id
            _try_set_model(lambda: _spec_from_upload(upload))
    if st.session_state.get("lx_model_error"):
        st.error(st.session_state["lx_model_error"])
    st.caption(f"Current: **{st.session_state['lx_spec'].model_id}**")


def _spec_from_upload(upload) -> lora_core.ModelSpec:
    checked = read_upload("lx_upload", upload)
    return lora_core.spec_from_text(checked.data, checked.name)


def _try_set_model(load) -> None:
    """Switch model only when the new one resolves and builds; otherwise keep the current one."""
    try:
        spec = load()
        lora_core.inventory(spec)
    except InputError as error:
        st.session_state["lx_model_error"] = f"{error} (keeping {st.session_state['lx_spec'].model_id})"
        return
    st.session_state["lx_model_error"] = None
    st.session_state["lx_spec"] = spec


# --- uploads: every uploader goes through `file_upload` and `read_upload` ----------------------


@dataclass(frozen=True)
class UploadRule:
    """What one uploader takes, checked on the server: the browser's cap can be bypassed."""

    what: str
    max_bytes: int
    suffixes: tuple[str, ...]

    @property
    def max_mb(self) -> int:
        """The cap in Streamlit's upload unit (MiB), rounded up."""
        return math.ceil(self.max_bytes / 2**20)


# Every uploader in the app, by widget key (`file_upload` refuses a key missing here). The largest
# cap is also the server's (.streamlit/config.toml `server.maxUploadSize`, checked by a test).
UPLOADS = {
    "lx_upload": UploadRule("a config.json", MAX_CONFIG_BYTES, (".json",)),
    "lx_import_upload": UploadRule("an adapter_config.json", IMPORT_MAX_BYTES, (".json",)),
    "lx_train_upload": UploadRule("a JSONL or CSV dataset", MAX_UPLOAD_BYTES, (".jsonl", ".json", ".csv")),
}


class UploadError(InputError):
    """An upload refused before it is parsed: too big, empty, or not one of the uploader's types."""


@dataclass(frozen=True)
class Upload:
    """An upload that passed its uploader's rule. `name` is for display only, never a path."""

    data: bytes
    name: str
    suffix: str
    digest: str

    @property
    def stored_name(self) -> str:
        """The name to store it under: its content hash and its checked suffix."""
        return f"{self.digest[:16]}{self.suffix}"


def file_upload(label: str, key: str, where=None):
    """`st.file_uploader` for uploader `key` of `UPLOADS`; read what it returns with `read_upload`.

    No `type=`: Streamlit checks a file's suffix when it reads the widget's state, before the
    script runs, and a crafted name (a NUL byte, another suffix) becomes a traceback there.
    `read_upload` checks the suffix instead, with a message."""
    rule = UPLOADS[key]
    kinds = ", ".join(rule.suffixes)
    return (where or st).file_uploader(
        label, key=key, max_upload_size=rule.max_mb, help=f"{kinds}, at most {rule.max_bytes / 1e6:g} MB"
    )


def read_upload(key: str, upload) -> Upload:
    """The checked content of `upload` (a Streamlit UploadedFile) from uploader `key`."""
    rule = UPLOADS[key]
    size = getattr(upload, "size", None)
    if isinstance(size, int) and size > rule.max_bytes:  # before the bytes are copied
        raise UploadError(_too_big(display_name(upload.name), size, rule))
    return check_upload(key, upload.name, upload.getvalue())


def check_upload(key: str, name: str, data: bytes) -> Upload:
    """`data` uploaded as `name` to uploader `key`, checked against its rule before any parsing:
    size, then suffix (of the sanitised name), then content. Raises `UploadError` in one line."""
    rule = UPLOADS[key]
    shown = display_name(name)
    if len(data) > rule.max_bytes:
        raise UploadError(_too_big(shown, len(data), rule))
    suffix = _suffix(name)
    if suffix not in rule.suffixes:
        kinds = (
            ", ".join(rule.suffixes[:-1]) + " or " + rule.suffixes[-1] if len(rule.suffixes) > 1 else rule.suffixes[0]
        )
        raise UploadError(f"{shown}: use a {kinds} file ({rule.what})")
    if not data.strip():
        raise UploadError(f"{shown} is empty: choose {rule.what}")
    return Upload(data, shown, suffix, hashlib.sha256(data).hexdigest())


def _too_big(shown: str, size: int, rule: UploadRule) -> str:
    return f"{shown} is {size / 1e6:,.1f} MB; {rule.what} may be at most {rule.max_bytes / 1e6:g} MB"


def _clean(text: str) -> str:
    """`text` without control, format (bidi overrides, zero-width) and separator characters."""
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def _base_name(name: str) -> str:
    """The last path part of a client-supplied name, cleaned (either slash counts)."""
    return _clean(str(name)).replace("\\", "/").rsplit("/", 1)[-1].strip()


def _suffix(name: str) -> str:
    base = _base_name(name)
    return PurePosixPath(base).suffix.lower() if base not in ("", ".", "..") else ""


def display_name(name: str, limit: int = 80) -> str:
    """A client-supplied file name made safe to show: its last path part, without control or
    direction-override characters, at most `limit` characters (the suffix kept)."""
    base = _base_name(name) or "(unnamed file)"
    if len(base) > limit:
        suffix = PurePosixPath(base).suffix[:16]
        base = base[: limit - len(suffix) - 1] + "…" + suffix
    return base


def settings_from_state(inv: lora_core.Inventory) -> tuple[LoraSettings, str]:
    """The LoraSettings the sidebar describes on `inv`'s model (its accepted values), and a note
    about the targets."""
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
    strategy = ok["lx_strategy"]
    if strategy == CUSTOM:
        return base.replace(target_modules=parse_targets(ok["lx_custom_targets"])), ""
    try:
        targets = resolve_strategy(inv, strategy)
    except StrategyError as error:
        return base.replace(target_modules=()), str(error)
    return targets.apply(base), targets.note


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
    except InputError as error:
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
