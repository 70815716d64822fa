"""The option lists of the engine, each defined once: a `Literal` type, its choices in display
order and, where users see them, their labels.

The CLI's `choices=`, the pages' select boxes and the engine's validation are all derived from
these, so adding a choice here adds it everywhere (and forgetting to handle it fails a test).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from lora_core.errors import short_repr

# Storage / compute precision of the base weights, the activations and the adapters.
Dtype = Literal["bf16", "fp16", "fp32"]
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
DTYPE_BYTES: dict[Dtype, int] = {"bf16": 2, "fp16": 2, "fp32": 4}

# Base-weight quantisation (bitsandbytes): "nf4" is QLoRA's 4-bit NormalFloat, "int8" LLM.int8.
Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)
QUANTIZATION_LABELS: dict[Quantization, str] = {"none": "none", "nf4": "4-bit NF4 (QLoRA)", "int8": "8-bit LLM.int8"}

Optimizer = Literal["adamw", "adamw_8bit", "sgd", "sgd_momentum"]
OPTIMIZERS: tuple[Optimizer, ...] = get_args(Optimizer)
OPTIMIZER_LABELS: dict[Optimizer, str] = {
    "adamw": "AdamW (fp32 moments)",
    "adamw_8bit": "8-bit AdamW",
    "sgd": "SGD",
    "sgd_momentum": "SGD with momentum",
}
# Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments; 8-bit AdamW two
# uint8 moments plus one fp32 absmax per 2,048-value block of each; SGD with momentum one buffer.
OPTIMIZER_STATE_BYTES: dict[Optimizer, float] = {
    "adamw": 8.0,
    "adamw_8bit": 2.0 + 8 / 2048,
    "sgd": 0.0,
    "sgd_momentum": 4.0,
}

# transformers' attention implementations (`attn_implementation`) the estimator models.
Attention = Literal["sdpa", "flash_attention_2", "eager"]
ATTENTIONS: tuple[Attention, ...] = get_args(Attention)

# Where the memory estimate is for: a CUDA GPU (max_memory_allocated) or the CPU (peak RSS).
MemoryDevice = Literal["cuda", "cpu"]
MEMORY_DEVICES: tuple[MemoryDevice, ...] = get_args(MemoryDevice)

# PEFT's `LoraConfig.bias`.
Bias = Literal["none", "all", "lora_only"]
BIASES: tuple[Bias, ...] = get_args(Bias)


def choice_problem(name: str, value: object, choices: Iterable[str]) -> str | None:
    """The one-line problem when `value` is not one of `choices`, else None."""
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return None
    return f"`{name}` must be one of {', '.join(choices)}, got {short_repr(value)}"


def adapter_dtype_for(dtype: Dtype, adapter_dtype: Dtype) -> Dtype:
    """The adapters' storage dtype for a base in `dtype`: a float32 base trains float32 adapters
    whatever was asked (a 16-bit adapter on a float32 base is not a setup PEFT produces)."""
    return "fp32" if dtype == "fp32" else adapter_dtype
