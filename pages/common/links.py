"""Shareable links: the URL carries the model and the settings (?model=...&r=...&alpha=...).

A link is read once, into a new session, and written back after every run, so a copied URL reopens
the same view. Each value is parsed here, then checked like a sidebar entry (`field_problem`); a
bad or stale one keeps its default, with one notice.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import lora_core
from lora_core.options import BIASES
from lora_core.strategies import STRATEGIES
from pages.common.fields import CUSTOM, SIDEBAR_DEFAULTS, field_problem
from pages.common.text import shorten

LINK_KEYS = {
    "r": ("lx_r", lambda v: _number(int, v)),
    "alpha": ("lx_alpha", lambda v: _number(float, v)),
    "dropout": ("lx_dropout", lambda v: _number(float, v)),
    "targets": ("lx_strategy", lambda v: v if v in (*STRATEGIES, CUSTOM) else None),
    "custom": ("lx_custom_targets", lambda v: v if v.strip() else None),
    "rslora": ("lx_rslora", lambda v: {"1": True, "0": False}.get(v)),
    "dora": ("lx_dora", lambda v: {"1": True, "0": False}.get(v)),
    "bias": ("lx_bias", lambda v: v if v in BIASES else None),
}


def _number(kind, text: str):
    """`text` as a `kind`, else None (a bad or stale link value)."""
    try:
        return kind(text)
    except (ValueError, OverflowError):
        return None


def load_link(params: Mapping[str, str], session: MutableMapping) -> None:
    """Take the model and settings of link `params` (`st.query_params`) into `session`
    (`st.session_state`); what cannot be used keeps its default and is named in `lx_url_notice`."""
    ignored = []
    model = params.get("model")
    if model:
        if model in lora_core.catalogue_ids():
            session["lx_spec"] = lora_core.resolve_model(model)
            session["lx_catalogue_choice"] = model
        else:
            ignored.append(f"model={shorten(model)}")
    for name, (key, parse) in LINK_KEYS.items():
        if name in params:
            value = parse(params[name])
            if value is None or field_problem(key, value):
                ignored.append(f"{name}={shorten(params[name])}")
            else:
                session[key] = value
    if ignored:
        session["lx_url_notice"] = (
            f"The link's {', '.join(ignored)} could not be used (unknown or out of range); defaults kept."
        )


def write_link(params: MutableMapping[str, str], session: Mapping) -> None:
    """Write the model and accepted settings of `session` into link `params`, leaving out defaults
    and touching only the values that changed."""
    state = session["lx_ok"]
    spec = session["lx_spec"]
    wanted = {
        "model": spec.model_id if spec.source == "catalogue" else None,
        "r": str(state["lx_r"]),
        "alpha": _link_float(state["lx_alpha"]),
        "dropout": _link_float(state["lx_dropout"]),
        "targets": state["lx_strategy"],
        "custom": state["lx_custom_targets"] if state["lx_strategy"] == CUSTOM else None,
        "rslora": "1" if state["lx_rslora"] else None,
        "dora": "1" if state["lx_dora"] else None,
        "bias": state["lx_bias"] if state["lx_bias"] != SIDEBAR_DEFAULTS["lx_bias"] else None,
    }
    for name, value in wanted.items():
        if value is None:
            if name in params:
                del params[name]
        elif params.get(name) != value:
            params[name] = value


def _link_float(value) -> str:
    """A float for the URL: short (`32`), unless that would change it."""
    value = float(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
