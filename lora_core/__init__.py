"""LoRA Explorer's engine: model resolution, exact LoRA parameter counts, strategies, simulations.

Never imports streamlit; returns plain data (dataclasses, DataFrames, dicts).
"""

from lora_core.counting import (
    CountResult,
    adaptable_leaf_names,
    count_lora_params,
    matched_module_names,
)
from lora_core.models import (
    Inventory,
    ModelResolutionError,
    ModelSpec,
    catalogue_ids,
    inventory,
    resolve_model,
    spec_from_text,
)
from lora_core.settings import ALL_LINEAR, LoraSettings, LoraSettingsError, lora_scale, unknown_keys

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "CountResult",
    "Inventory",
    "LoraSettings",
    "LoraSettingsError",
    "ModelResolutionError",
    "ModelSpec",
    "adaptable_leaf_names",
    "catalogue_ids",
    "count_lora_params",
    "inventory",
    "lora_scale",
    "matched_module_names",
    "resolve_model",
    "spec_from_text",
    "unknown_keys",
]
