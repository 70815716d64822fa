"""Which GPUs a setup fits on, and the largest batch or sequence that would."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pandas as pd

from lora_core.counting import CountResult, count_lora_params
from lora_core.memory.estimate import estimate_memory
from lora_core.memory.setup import MemorySetupError, TrainSetup
from lora_core.memory.terms import GIB
from lora_core.models import Inventory, as_inventory
from lora_core.settings import LoraSettings

GPUS_GIB = (24, 40, 48, 80, 141)


def largest_fitting(
    model: str | Inventory,
    settings: LoraSettings,
    setup: TrainSetup,
    capacity_gib: float,
    vary: str = "batch_size",
    limit: int = 1 << 20,
    count: CountResult | None = None,
) -> int:
    """The largest `vary` ("batch_size" or "seq_len") whose estimate fits `capacity_gib`, 0 when not
    even 1 fits. The estimate grows with both, so this is a binary search."""
    if vary not in ("batch_size", "seq_len"):
        raise MemorySetupError(f"`vary` must be batch_size or seq_len, got {vary!r}")
    inv = as_inventory(model)
    count = count if count is not None else count_lora_params(inv, settings)

    def fits(value: int) -> bool:
        varied = replace(setup, batch_size=value) if vary == "batch_size" else replace(setup, seq_len=value)
        return estimate_memory(inv, settings, varied, count).fits(capacity_gib)

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fits_table(
    model: str | Inventory,
    settings: LoraSettings,
    setup: TrainSetup,
    gpus: Iterable[float] = GPUS_GIB,
    count: CountResult | None = None,
) -> pd.DataFrame:
    """One row per GPU size: whether the setup fits, and the largest batch size and sequence
    length that would (each with the other held at the setup's value)."""
    inv = as_inventory(model)
    count = count if count is not None else count_lora_params(inv, settings)
    estimate = estimate_memory(inv, settings, setup, count)
    rows = []
    for gib in gpus:
        rows.append(
            {
                "GPU GiB": gib,
                "fits": estimate.fits(gib),
                "headroom GiB": gib - estimate.required_bytes / GIB,
                "largest batch": largest_fitting(inv, settings, setup, gib, "batch_size", 4096, count),
                "longest sequence": largest_fitting(inv, settings, setup, gib, "seq_len", 1 << 20, count),
            }
        )
    return pd.DataFrame(rows)


def strategy_table(
    model: str | Inventory, settings: LoraSettings, setup: TrainSetup, gpus: Iterable[float] = GPUS_GIB
) -> pd.DataFrame:
    """The estimate for each target-module strategy mapped onto the model, side by side: its
    trainable parameters, required GiB, and the largest batch that fits each GPU size."""
    from lora_core.strategies import STRATEGIES, StrategyError, settings_on_model

    inv = as_inventory(model)
    rows: list[dict[str, object]] = []
    for name in STRATEGIES:
        try:
            # per-module patterns name the sidebar's own targets, not the strategy's
            strategy_settings, _ = settings_on_model(settings.replace(rank_pattern={}, alpha_pattern={}), name, inv)
            count = count_lora_params(inv, strategy_settings)
        except (StrategyError, ValueError) as error:
            rows.append({"strategy": name, "error": str(error)})
            continue
        estimate = estimate_memory(inv, strategy_settings, setup, count)
        row = {
            "strategy": name,
            "trainable_params": count.trainable_params,
            "required GiB": estimate.required_bytes / GIB,
            "activations GiB": sum(t.bytes for t in estimate.terms if t.group == "activations") / GIB,
            "error": "",
        }
        for gib in gpus:
            row[f"batch on {gib:g} GiB"] = largest_fitting(
                inv, strategy_settings, setup, gib, "batch_size", 4096, count
            )
        rows.append(row)
    return pd.DataFrame(rows)
