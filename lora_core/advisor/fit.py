"""The advisor's memory fit: the cheapest training setup (bf16, gradient checkpointing, QLoRA)
and micro-batch that fit the user's GPU, by the engine's memory estimate."""

from __future__ import annotations

import math
from dataclasses import replace

from lora_core.advisor.advice import Alternative, Case, Choice
from lora_core.advisor.figures import Ledger, show
from lora_core.counting import CountResult
from lora_core.memory import GIB, GPUS_GIB, MemoryEstimate, TrainSetup, estimate_memory, largest_fitting
from lora_core.models import Inventory
from lora_core.settings import LoraSettings


def choose_setup(
    inv: Inventory, settings: LoraSettings, count: CountResult, seq_len: int, case: Case, book: Ledger
) -> tuple[Choice, MemoryEstimate, int, bool]:
    """The first setup, in the order of what it costs the run, where a micro-batch fits the GPU:
    bf16, then gradient checkpointing, then QLoRA (NF4) with checkpointing; with memory first,
    QLoRA with checkpointing at micro-batch 1 straight away. Returns the choice, the estimate of
    the setup chosen (the lightest tried when none fits), the gradient accumulation and whether
    it fits."""
    effective = int(book.claim_value("app-batch", "effective_batch"))
    base = TrainSetup(batch_size=1, seq_len=seq_len, dtype="bf16", device="cuda")
    ladder = [
        ("bf16", base),
        ("bf16 with gradient checkpointing", replace(base, gradient_checkpointing=True)),
        ("QLoRA (NF4) with gradient checkpointing", replace(base, quantization="nf4", gradient_checkpointing=True)),
    ]
    if case.priority == "memory":
        ladder = ladder[-1:]
    gpu = book.given(case.gpu_gib, "gpu_gib")
    tried: list[str] = []
    for label, setup in ladder:
        if case.priority == "memory":
            micro = 1
        else:
            fitting = largest_fitting(inv, settings, setup, case.gpu_gib, "batch_size", effective, count)
            # a divisor of the effective batch, so micro-batch x accumulation is exactly it
            micro = max((d for d in range(1, fitting + 1) if effective % d == 0), default=1)
        estimate = estimate_memory(inv, settings, replace(setup, batch_size=micro), count)
        need = estimate.required_bytes / GIB
        if estimate.fits(case.gpu_gib):
            accumulation = max(1, math.ceil(effective / micro))
            rule = (
                f"Fits on your {gpu} GiB GPU: {label}, micro-batch {book.engine(micro, 'largest micro-batch that fits')} x "
                f"{book.engine(accumulation, 'gradient accumulation')} accumulation steps = an effective batch of "
                f"{book.claim('app-batch', 'effective_batch')} (QLoRA's), estimated peak "
                f"{book.engine(need, 'estimated GiB', f'{need:.1f}')} GiB."
            )
            if tried:
                rule += " Nearest change that makes it fit: " + label + "; " + "; ".join(tried) + "."
            alternatives: tuple[Alternative, ...] = ()
            if label == "bf16":
                alternatives = (
                    Alternative(
                        "gradient checkpointing",
                        "a larger micro-batch, paid for by recomputing each layer's activations in backward",
                        ("app-batch",),
                    ),
                )
            claims = ("app-batch", "tm-batch-penalty") + (("qlora-scripts",) if "QLoRA" in label else ())
            value = f"{label}, micro-batch {show(micro)} x {show(accumulation)}"
            return Choice("memory", value, rule, claims, (), alternatives), estimate, accumulation, True
        tried.append(f"{label} at micro-batch 1 needs {book.engine(need, 'estimated GiB', f'{need:.1f}')} GiB")
    label = ladder[-1][0]
    smallest = next((gib for gib in GPUS_GIB if estimate.fits(gib)), None)  # the lightest: the last tried
    where = (
        f"the smallest common GPU it fits is {book.engine(smallest, 'smallest fitting GPU size')} GiB"
        if smallest
        else f"it fits none of the common GPU sizes up to {book.engine(GPUS_GIB[-1], 'largest GPU size')} GiB"
    )
    rule = f"Does not fit on your {gpu} GiB GPU even with {label} at micro-batch 1: " + "; ".join(tried) + f"; {where}."
    alternatives = (
        Alternative("several GPUs", "shard the model (FSDP, DeepSpeed ZeRO): not estimated here", ("app-batch",)),
    )
    choice = Choice("memory", "does not fit", rule, ("app-batch", "qlora-scripts"), (), alternatives)
    return choice, estimate, effective, False  # at micro-batch 1, the whole effective batch is accumulated
