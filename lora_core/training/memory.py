"""A run's memory: the estimator's peak for it before it starts (`lora_core.memory`) and the peak
measured while it trains (CUDA's allocator counters, or the process's resident set on the CPU)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lora_core.devices import train_dtype
from lora_core.options import ATTENTIONS, Attention
from lora_core.settings import LoraSettings

if TYPE_CHECKING:
    from lora_core.memory import TrainSetup
    from lora_core.training.config import TrainConfig


def eval_batch_size(config: TrainConfig) -> int:
    """The evaluation batch of a run: at least 8, so the baseline and eval passes stay quick."""
    return max(config.batch_size, 8)


def memory_setup(config: TrainConfig, seq: int, device: str, attention: Attention = "sdpa") -> TrainSetup:
    """The estimator's `TrainSetup` for a run of `config` on `device`: the dtype the run loads the
    model in, its batch, `seq` tokens per example and its evaluation batch."""
    from lora_core.memory import TrainSetup

    return TrainSetup(
        batch_size=config.batch_size,
        seq_len=seq,
        dtype=train_dtype(device),
        device="cuda" if device.startswith("cuda") else "cpu",
        attention=attention,
        eval_batch_size=eval_batch_size(config),
    )


def run_memory_estimate_mb(model, settings: LoraSettings, config: TrainConfig, seq: int, device: str) -> float | None:
    """`lora_core.memory`'s peak estimate for this run, from the loaded model's own config (its
    longest example as the sequence length: batches are padded to their longest); None when the
    estimator cannot take the model."""
    from lora_core.memory import estimate_memory
    from lora_core.models import inventory, spec_from_text

    if device == "mps":  # unified memory: the process's RSS is not what Metal holds
        return None
    try:
        spec = spec_from_text(
            model.config.to_json_string(use_diff=False), getattr(model, "name_or_path", "") or "model", "local"
        )
        setup = memory_setup(config, seq, device, attention_of(model))
        return estimate_memory(inventory(spec), settings, setup).peak_bytes / 2**20
    except Exception:  # an estimate is a nicety: it never stops a run
        return None


def attention_of(model) -> Attention:
    """The attention implementation `model` runs with, as the estimator names it ("sdpa" for one
    the estimator does not model)."""
    name = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return name if name in ATTENTIONS else "sdpa"


def reset_peak_memory(device: str) -> None:
    """Start this run's peak: CUDA's counters, or the process's RSS high-water mark (Linux lets a
    process reset VmHWM; elsewhere the lifetime peak of the worker is what there is)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what earlier runs left, so the peak is this run's
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: str) -> float:
    """MiB since `reset_peak_memory`: CUDA max allocated on a GPU; the process's peak RSS on the CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
