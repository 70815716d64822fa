"""How a run trains, as the memory estimate needs it: `TrainSetup` and its validation."""

from __future__ import annotations

from dataclasses import dataclass

from lora_core.errors import InputError, positive_int_problem
from lora_core.models import MAX_POSITIONS
from lora_core.options import (
    ATTENTIONS,
    DTYPE_BYTES,
    MEMORY_DEVICES,
    OPTIMIZER_STATE_BYTES,
    QUANTIZATIONS,
    Attention,
    Dtype,
    MemoryDevice,
    Optimizer,
    Quantization,
    choice_problem,
)

# Beyond any real per-device run: larger values are typos, and their estimates mean nothing.
MAX_BATCH = 1 << 16
MAX_SEQ_LEN = MAX_POSITIONS  # the longest position table a config may have


class MemorySetupError(InputError):
    """A training setup the estimator cannot take; the message names every bad field."""


@dataclass(frozen=True)
class TrainSetup:
    """How the run trains. `dtype` is the storage of the base weights and the activations (the
    compute dtype under QLoRA); `quantization` "nf4" is QLoRA's 4-bit NormalFloat (bitsandbytes),
    "int8" LLM.int8. `eval_batch_size`, when set, adds an evaluation pass (no gradients) whose
    peak can exceed training's at small training batches. `adapter_dtype` is the adapters' storage
    (PEFT upcasts them to fp32 unless `autocast_adapter_dtype=False`; PEFT before 0.19 kept them
    fp32 on 4-bit layers even then); `autocast` is mixed precision as the Trainer's
    `bf16=True`/`fp16=True` runs it (ignored for fp32). `padded`: batches padded to their longest
    carry an attention mask, which makes transformers' SDPA expand k and v to every head and keep a
    seq x seq mask per layer (packed or equal-length batches have none). `bnb_saves_input`:
    bitsandbytes 0.39 to 0.43.1 kept the input of every 4-bit matmul for backward even though the
    frozen weight needs no gradient (fixed in 0.43.2); set it for runs on those versions.

    Non-quantised weights stay in `dtype`: PEFT's `prepare_model_for_kbit_training`, which casts
    them (embeddings, head, norms) to float32, is not modelled."""

    batch_size: int = 4
    seq_len: int = 1024
    dtype: Dtype = "bf16"
    quantization: Quantization = "none"
    double_quant: bool = True
    optimizer: Optimizer = "adamw"
    gradient_checkpointing: bool = False
    attention: Attention = "sdpa"
    device: MemoryDevice = "cuda"
    eval_batch_size: int | None = None
    adapter_dtype: Dtype = "fp32"
    autocast: bool = True
    padded: bool = True
    bnb_saves_input: bool = False

    def problems(self) -> list[str]:
        """Every reason the estimator cannot take this setup, one line each (empty when none)."""
        found = [
            positive_int_problem("batch_size", self.batch_size, MAX_BATCH),
            positive_int_problem("seq_len", self.seq_len, MAX_SEQ_LEN),
            None
            if self.eval_batch_size is None
            else positive_int_problem("eval_batch_size", self.eval_batch_size, MAX_BATCH),
            choice_problem("dtype", self.dtype, DTYPE_BYTES),
            choice_problem("adapter_dtype", self.adapter_dtype, DTYPE_BYTES),
            choice_problem("quantization", self.quantization, QUANTIZATIONS),
            choice_problem("optimizer", self.optimizer, OPTIMIZER_STATE_BYTES),
            choice_problem("attention", self.attention, ATTENTIONS),
            choice_problem("device", self.device, MEMORY_DEVICES),
        ]
        if self.quantization != "none" and self.device != "cuda":
            found.append("`quantization` (bitsandbytes int8 / nf4) needs device 'cuda'")
        if self.quantization != "none" and self.dtype == "fp32":
            found.append("`quantization` computes in bf16 or fp16: set `dtype` to one of them")
        if self.bnb_saves_input and self.quantization != "nf4":
            found.append("`bnb_saves_input` describes bitsandbytes' 4-bit matmul: it needs quantization 'nf4'")
        if self.dtype == "fp32" and self.adapter_dtype != "fp32":
            found.append("`adapter_dtype` must be fp32 when the base is fp32")
        if self.attention == "flash_attention_2" and self.dtype == "fp32":
            found.append("`attention` flash_attention_2 needs bf16 or fp16")
        if self.attention == "flash_attention_2" and self.device != "cuda":
            found.append("`attention` flash_attention_2 needs device 'cuda'")
        return [problem for problem in found if problem]

    def checked(self) -> TrainSetup:
        """This setup; raises `MemorySetupError` naming every problem when it has any."""
        problems = self.problems()
        if problems:
            raise MemorySetupError("; ".join(problems))
        return self
