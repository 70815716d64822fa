"""The sidebar's fields: each new session's value, the sliders' tops, and which values each takes.

Per-user state lives in `st.session_state` under `lx_*` keys. `lx_ok` holds the last value of each
field that the engine accepted: the settings are built from it, so a bad value in a field shows one
error under that field and changes nothing else, and a widget whose value a failed run dropped
comes back from it (nothing the user set is lost).
"""

from __future__ import annotations

from lora_core import LoraSettings
from lora_core.errors import InputError
from lora_core.settings import parse_targets

DEFAULT_MODEL = "meta-llama/Llama-2-7b-hf"
CUSTOM = "Custom"
# The sliders' tops. The engine takes r up to 65,536 and dropout in [0, 1); a rank slider that wide
# would be unusable, so an imported r above 256 is refused with a message, never clamped.
R_MAX = 256
DROPOUT_MAX = 0.99

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
ENGINE_FIELDS = {"lx_r": "r", "lx_alpha": "lora_alpha", "lx_dropout": "lora_dropout"}
ENGINE_FIELDS["lx_custom_targets"] = "target_modules"
WIDGET_MAX = {"lx_r": R_MAX, "lx_dropout": DROPOUT_MAX}


def field_problem(key: str, value) -> str | None:
    """Why sidebar field `key` cannot take `value`, in one line (the engine's check, then the
    widget's range); None when it can."""
    if key not in ENGINE_FIELDS:
        return None
    if key == "lx_custom_targets":
        if not isinstance(value, str):
            return "custom targets must be text"
        value = parse_targets(value)
    try:
        problems = LoraSettings(**{ENGINE_FIELDS[key]: value}).problems()
    except InputError as error:
        return str(error)
    if problems:
        return problems[0]
    if key in WIDGET_MAX and value > WIDGET_MAX[key]:
        return f"`{ENGINE_FIELDS[key]}` = {value:g} is above the sidebar's maximum of {WIDGET_MAX[key]:g}"
    return None
