"""What the LoRA branches save for backward, per layer.

A branch `B(A(dropout(x)))` saves its input, the dropout mask and A's output. In bf16/fp16 training
PEFT keeps the adapter in float32 and autocast saves a 16-bit copy of x per adapted module; when
the adapter has the base's dtype, modules reading the same tensor share it, unless dropout gives
each its own copy. DoRA also saves the base output and the LoRA output of every adapted module.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_core.counting import CountResult
from lora_core.memory.formula import Formula, counted, qty, total
from lora_core.memory.layer import INPUT_GROUPS
from lora_core.memory.setup import TrainSetup
from lora_core.memory.shape import block_name
from lora_core.options import DTYPE_BYTES
from lora_core.settings import LoraSettings


@dataclass(frozen=True)
class LoraLayer:
    """The saved bytes of one layer's LoRA branches: per token, and fixed (LoRA on fused expert
    weights keeps the merged W + s B A of the whole expert stack); `kept_inputs` are the layer's
    inputs (`INPUT_GROUPS` keys or in-block names) a branch saves as they are, uncast and undropped."""

    per_token: Formula
    fixed: Formula | None
    kept_inputs: frozenset[str]

    def bytes(self, tokens: Formula) -> Formula:
        saved = tokens * self.per_token
        return saved if self.fixed is None else saved + self.fixed


def lora_layers(count: CountResult, settings: LoraSettings, setup: TrainSetup, routed: int = 1) -> dict[int, LoraLayer]:
    """The `LoraLayer` of every layer with an adapted module (-1: modules outside the blocks).
    Each expert matmul of LoRA on fused expert weights keeps its input, every token `routed` times."""
    rows = count.modules
    if rows.empty:
        return {}
    act = qty(DTYPE_BYTES[setup.dtype], "B")
    lora = qty(lora_compute_bytes(setup), "B")
    shared = setup.adapter_dtype == setup.dtype  # no cast: modules with one input share it
    # CUDA's fused dropout keeps a bool mask, the CPU a float one
    mask = qty(1, "B bool mask") if setup.device == "cuda" else qty(lora.value, "B float mask")
    dropout = settings.lora_dropout > 0
    layers = {}
    for layer, group in rows.groupby("layer"):
        modules, constant, kept, shared_inputs = [], [], set(), set()
        for row in group.itertuples(index=False):
            d_in, d_out, rank = qty(int(row.in_features), "d_in"), qty(int(row.out_features), "d_out"), int(row.rank)
            if row.kind == "param":  # LoRA on fused expert weights (target_parameters)
                experts = qty(max(int(row.experts), 1), "experts")
                constant.append((experts * d_in * d_out * act).note("the merged weight"))
                modules.append((qty(max(routed, 1), "top-k") * d_in * act).note("expert input"))
                continue
            r = qty(rank, "r")
            if row.kind == "embedding":  # looks rows of A up by token id: keeps only A's output
                modules.append((r * lora).note("A's output"))
                continue
            parts = []
            if dropout:
                parts.append(d_in * (qty(lora.value, "B dropped copy") + mask))
            elif shared and row.role == "attn_o" and setup.attention != "eager":
                pass  # its input is the attention kernel's saved output
            elif shared:
                key = INPUT_GROUPS.get(row.role, str(row.name))
                if key not in shared_inputs:
                    shared_inputs.add(key)
                    kept.add(INPUT_GROUPS.get(row.role, block_name(str(row.name), int(layer))))
                    parts.append((d_in * act).note(f"{key} input, shared"))
            else:
                parts.append((d_in * lora).note("the input cast for the adapter"))
            parts.append((r * lora).note("A's output"))
            if settings.use_dora:
                parts.append((2 * d_out * lora).note("DoRA: base and LoRA outputs"))
            modules.append(total(parts))
        fixed = total(constant) if constant else None
        layers[int(layer)] = LoraLayer(total(counted(modules, "modules")), fixed, frozenset(kept))
    return layers


def lora_compute_bytes(setup: TrainSetup) -> int:
    """Element size of the LoRA matmuls' saved inputs: autocast runs a float32 adapter in the 16-bit
    dtype; without autocast PEFT casts the input to the adapter's dtype."""
    if setup.dtype != "fp32" and setup.autocast:
        return DTYPE_BYTES[setup.dtype]
    return DTYPE_BYTES[setup.adapter_dtype]
