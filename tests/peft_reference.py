"""The reference no one here wrote: real PEFT on a fresh meta-device model."""

from __future__ import annotations

import copy
import warnings

from lora_core.models import build_meta_model, resolve_model
from lora_core.settings import LoraSettings


def peft_counts(model_id: str, settings: LoraSettings) -> tuple[int, int]:
    """`get_peft_model(model, LoraConfig(...)).get_nb_trainable_parameters()` for `settings`."""
    from peft import get_peft_model

    model = build_meta_model(resolve_model(model_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, copy.deepcopy(settings.to_peft_config()), low_cpu_mem_usage=True)
    return peft_model.get_nb_trainable_parameters()
