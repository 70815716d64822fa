"""Which torch device a simulation or a run uses (the one asked for, checked, or the best there is),
and the dtype a run trains in there."""

from __future__ import annotations

import re

from lora_core.errors import InputError
from lora_core.options import Dtype

DEVICE_FORMS = "cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"cpu|mps|cuda(:\d{1,3})?")


class DeviceError(InputError):
    """A device name that is malformed or not present on this machine."""


def check_device_name(name: str) -> list[str]:
    """Problems with a device name's form (no hardware is probed): `DEVICE_FORMS` only."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        shown = repr(name)[:40]
        return [f"`device` must be {DEVICE_FORMS}, got {shown}"]
    return []


def pick_device(preference: str | None = None) -> str:
    """`preference` when given, well-formed and present, else "cuda", then "mps", then "cpu".

    Raises `DeviceError` for a malformed name ("banana" once trained on the CPU and reported
    success) or a device this machine lacks."""
    import torch

    if preference:
        problems = check_device_name(preference)
        if problems:
            raise DeviceError(problems[0])
        if preference.startswith("cuda"):
            if not torch.cuda.is_available():
                raise DeviceError(f"device {preference!r} requested but CUDA is not available here: use --device cpu")
            index = int(preference.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise DeviceError(f"device {preference!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if preference == "mps" and not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' requested but MPS is not available here: use --device cpu")
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def train_dtype(device: str) -> Dtype:
    """The dtype a run on `device` loads its base model and trains in: "bf16" on a CUDA device that
    supports it, else "fp32" (the CPU and MPS train in full precision)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def torch_dtype(dtype: Dtype):
    """The `torch.dtype` of an option value ("bf16" is `torch.bfloat16`)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
