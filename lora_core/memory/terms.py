"""The terms of the estimate that do not depend on the activations' layout: weights, adapters,
their gradients and optimizer state, bitsandbytes' and DoRA's transients, and the overheads."""

from __future__ import annotations

from dataclasses import dataclass

from lora_core.counting import CountResult
from lora_core.memory.formula import Formula, qty
from lora_core.memory.setup import TrainSetup
from lora_core.memory.shape import QuantisedLinears
from lora_core.options import DTYPE_BYTES, OPTIMIZER_STATE_BYTES
from lora_core.settings import LoraSettings

GIB = 2**30
MIB = 2**20
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
NF4_DOUBLE_QUANT_BLOCK = 256  # double quantisation: 8-bit absmax, one fp32 constant per 256 of them
# The CUDA context, kernels and cuBLAS workspaces occupy the card outside max_memory_allocated.
CUDA_CONTEXT_BYTES = 1 * GIB
# The caching allocator reserves more than it hands out, in proportion to the churn of activations.
ALLOCATOR_SLACK = 0.20
# A Python process with torch, transformers, PEFT and the Trainer imported is this large before it
# allocates a tensor.
CPU_PROCESS_BYTES = 420 * MIB
# glibc malloc keeps freed activation memory mapped, so the resident peak exceeds the live peak.
CPU_ALLOCATOR_SLACK = 0.30


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    formula: str
    group: str  # "weights" | "adapter" | "activations" | "logits" | "process" (CPU) | "overhead" (GPU)


def term(name: str, formula: Formula, group: str) -> MemoryTerm:
    """A term whose bytes are `formula`'s value in whole bytes and whose text is `formula`'s."""
    return MemoryTerm(name, int(formula.value), formula.text, group)


def weight_terms(count: CountResult, setup: TrainSetup, linears: QuantisedLinears) -> list[MemoryTerm]:
    """The base weights: in `dtype`, or the quantised Linear layers and the rest."""
    base = count.base_params
    dense = qty(DTYPE_BYTES[setup.dtype], f"B ({setup.dtype})")
    if setup.quantization == "none":
        return [term("base weights", qty(base, "params") * dense, "weights")]
    quantised = qty(linears.params, "params")
    if setup.quantization == "nf4":
        if setup.double_quant:
            constants = qty(1, "B absmax") / qty(NF4_BLOCK, "weights") + qty(4, "B float32 constant") / (
                qty(NF4_BLOCK, "weights") * qty(NF4_DOUBLE_QUANT_BLOCK, "blocks")
            )
        else:
            constants = qty(4, "B float32 absmax") / qty(NF4_BLOCK, "weights")
        per_weight = qty(0.5, "B NF4") + constants
        quant = term("base weights: 4-bit NF4 layers", (quantised * per_weight).whole(), "weights")
    else:
        scales = qty(linears.rows, "rows") * qty(4, "B scale")
        quant = term("base weights: int8 layers", quantised * qty(1, "B") + scales, "weights")
    rest = qty(base - linears.params, "params").note("embeddings, head, norms, fused experts")
    return [quant, term("base weights: not quantised", rest * dense, "weights")]


def adapter_terms(count: CountResult, setup: TrainSetup) -> list[MemoryTerm]:
    """The adapters (in `adapter_dtype`: PEFT upcasts only LoRA's own weights) and what else trains:
    modules_to_save copies (a second copy, in the base dtype) and biases (trained in place); their
    gradients and optimizer state."""
    kept = "PEFT's float32 upcast" if setup.adapter_dtype == "fp32" else setup.adapter_dtype
    lora_bytes = qty(DTYPE_BYTES[setup.adapter_dtype], f"B ({kept})")
    base_bytes = qty(DTYPE_BYTES[setup.dtype], f"B ({setup.dtype})")
    lora, copies, biases = count.lora_params, count.saved_module_params, count.bias_params
    adapters = qty(lora, "LoRA") * lora_bytes
    stored = adapters + qty(copies, "modules_to_save") * base_bytes if copies else adapters
    others = copies + biases
    gradients = adapters + qty(others, "modules_to_save and biases") * base_bytes if others else adapters
    state = OPTIMIZER_STATE_BYTES[setup.optimizer]
    if setup.optimizer in ("adamw", "sgd_momentum"):  # moments in the parameter's dtype
        optimizer = qty(state, "B state") / qty(4, "B float32") * gradients
        optimizer = (
            optimizer.note("two moments per parameter, in its dtype") if setup.optimizer == "adamw" else optimizer
        )
    else:
        optimizer = qty(lora + others, "trainable") * qty(state, "B state")
    return [
        term("LoRA parameters", stored, "adapter"),
        term("LoRA gradients", gradients, "adapter"),
        term(f"optimizer state ({setup.optimizer})", optimizer.whole(), "adapter"),
    ]


def dora_terms(count: CountResult, settings: LoraSettings) -> list[MemoryTerm]:
    """DoRA's weight norm: the largest adapted weight rebuilt as W + B A in float32, and its norm."""
    if not settings.use_dora or count.modules.empty:
        return []
    rows = count.modules
    biggest = qty(int((rows["in_features"] * rows["out_features"]).max()), "weights (largest adapted)")
    return [term("DoRA weight norm", biggest * qty(4, "B") * 2, "activations")]


def dequant_terms(setup: TrainSetup, linears: QuantisedLinears) -> list[MemoryTerm]:
    """bitsandbytes rebuilds each quantised weight in the compute dtype for its matmul."""
    if setup.quantization == "none":
        return []
    biggest = qty(linears.biggest, "weights (largest quantised layer)")
    return [term("dequantised weight", biggest * qty(DTYPE_BYTES[setup.dtype], "B"), "weights")]


def overhead_terms(setup: TrainSetup, dynamic: int) -> list[MemoryTerm]:
    """What the device needs beyond the live peak; `dynamic` is the peak less the base weights
    (allocated once, in large blocks, so they fragment nothing)."""
    rest = qty(dynamic, "B (all but the weights)")
    if setup.device == "cpu":
        slack = (qty(CPU_ALLOCATOR_SLACK) * rest).note("glibc keeps freed blocks resident")
        process = qty(CPU_PROCESS_BYTES, "B").note(
            "interpreter with torch, transformers, PEFT and the Trainer imported"
        )
        return [term("malloc slack", slack.whole(), "process"), term("Python process", process, "process")]
    context = qty(CUDA_CONTEXT_BYTES, "B (CUDA context, kernels, workspaces)")
    reserve = (qty(ALLOCATOR_SLACK) * rest).whole().note("the caching allocator's reserve")
    return [term("CUDA context and allocator slack", context + reserve, "overhead")]
