"""Peak training memory of a LoRA run, term by term, from the model's module inventory.

The estimate is what a Hugging Face `Trainer` + PEFT run holds at its peak: on a GPU the figure
`torch.cuda.max_memory_allocated()` reports, on the CPU the process's peak resident set. Each term
carries the formula that computes it (`formula`); `estimate_memory` returns them all.

The modules, one concept each: `setup` (how the run trains), `shape` (what the accounting needs of
an architecture), `layer` (what one decoder layer saves for backward), `lora` (what the LoRA
branches save), `terms` (weights, adapters, optimizer state, overheads), `estimate` (the sum at
the peak), `search` (the "fits on" tables), `formula` (numbers that carry their own formula).

Gradient checkpointing keeps only each layer's input and recomputes one layer at a time; the loss
keeps float32 log-probabilities of every token over the vocabulary, and backward adds their
gradient and the logits' gradient (12 bytes per token x vocab entry).
"""

from lora_core.memory.estimate import MemoryEstimate, estimate_memory
from lora_core.memory.search import GPUS_GIB, fits_table, largest_fitting, strategy_table
from lora_core.memory.setup import MAX_BATCH, MAX_SEQ_LEN, MemorySetupError, TrainSetup
from lora_core.memory.terms import (
    ALLOCATOR_SLACK,
    CPU_ALLOCATOR_SLACK,
    CPU_PROCESS_BYTES,
    CUDA_CONTEXT_BYTES,
    GIB,
    MIB,
    NF4_BLOCK,
    NF4_DOUBLE_QUANT_BLOCK,
    MemoryTerm,
)

__all__ = [
    "ALLOCATOR_SLACK",
    "CPU_ALLOCATOR_SLACK",
    "CPU_PROCESS_BYTES",
    "CUDA_CONTEXT_BYTES",
    "GIB",
    "GPUS_GIB",
    "MAX_BATCH",
    "MAX_SEQ_LEN",
    "MIB",
    "NF4_BLOCK",
    "NF4_DOUBLE_QUANT_BLOCK",
    "MemoryEstimate",
    "MemorySetupError",
    "MemoryTerm",
    "TrainSetup",
    "estimate_memory",
    "fits_table",
    "largest_fitting",
    "strategy_table",
]
