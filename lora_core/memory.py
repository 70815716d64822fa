"""Peak training memory of a LoRA run, term by term, from the model's module inventory.

The estimate is what a Hugging Face `Trainer` + PEFT run holds at its peak: on a GPU the figure
`torch.cuda.max_memory_allocated()` reports, on the CPU the process's peak resident set. Each term
comes with its formula; `estimate_memory` returns them all.

How activations are counted (the saved-tensor accounting of PyTorch autograd, checked against
`torch.autograd.graph.saved_tensors_hooks` on real models in tests/test_memory.py):
- a frozen Linear saves no input (its weight gets no gradient), so the base projections cost
  nothing; what is saved per layer is the input of each norm (RMSNorm upcasts it to float32),
  the attention kernel's q, k, v, output and log-sum-exp (SDPA / FlashAttention; eager attention
  also keeps the S x S probabilities), and the MLP's activation input, activation output and up
  projection (gated MLPs) or the activation input (plain MLPs);
- a LoRA branch `B(A(dropout(x)))` saves its input (in bf16/fp16 training PEFT keeps the adapter
  in float32 and autocast saves a bf16 copy of x per adapted module; in float32 modules sharing
  an input share it unless dropout gives each its own copy), the dropout mask, and A's output;
  DoRA also saves the base output and the LoRA output of every adapted module;
- gradient checkpointing keeps only each layer's input, and recomputes one layer at a time;
- the loss keeps float32 log-probabilities of every token over the vocabulary, and backward adds
  their gradient and the logits' gradient (12 bytes per token x vocab entry).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from lora_core.counting import CountResult, count_lora_params
from lora_core.errors import InputError
from lora_core.models import MAX_POSITIONS, Inventory, as_inventory
from lora_core.settings import LoraSettings

GIB = 2**30
MIB = 2**20
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZATIONS = ("none", "int8", "nf4")
# bytes of optimizer state per trainable parameter
OPTIMIZERS = {"adamw": 8.0, "adamw_8bit": 2.0 + 8 / 2048, "sgd": 0.0, "sgd_momentum": 4.0}
ATTENTION = ("sdpa", "flash_attention_2", "eager")
DEVICES = ("cuda", "cpu")
GPUS_GIB = (24, 40, 48, 80, 141)
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
NF4_DOUBLE_QUANT_BLOCK = 256  # double quantisation: 8-bit absmax, one fp32 constant per 256 of them
# Stated framework overheads. GPU: the CUDA context, kernels and cuBLAS workspaces sit outside
# max_memory_allocated but occupy the card; the caching allocator reserves more than it hands out.
# (Measured: a QLoRA run's max reserved is 2.4 GB above its max allocated, ~20% of its
# activations, see tests/test_memory.py.)
CUDA_CONTEXT_BYTES = 1 * GIB
ALLOCATOR_SLACK = 0.20
# CPU: a Python process with torch, transformers, PEFT and the Trainer imported (measured:
# 411-421 MiB resident on torch 2.13 / transformers 5.24 / peft 0.21, Linux x86-64), and glibc
# malloc's slack: it keeps freed activation memory mapped, so the resident peak exceeds the live
# peak and creeps up over steps (measured on SmolLM2, batch 8: the resident peak of the fourth step
# was 19-44% of the non-weight memory above that of the same run with
# MALLOC_MMAP_THRESHOLD_=131072, which returns every large block at once).
CPU_PROCESS_BYTES = 420 * MIB
CPU_ALLOCATOR_SLACK = 0.30


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
    (PEFT upcasts them to fp32 unless `autocast_adapter_dtype=False`); `autocast` is mixed
    precision as the Trainer's `bf16=True`/`fp16=True` runs it (ignored for fp32). `padded`: batches
    padded to their longest carry an attention mask, which makes transformers' SDPA expand k and v
    to every head and keep a seq x seq mask per layer (packed or equal-length batches have none)."""

    batch_size: int = 4
    seq_len: int = 1024
    dtype: str = "bf16"
    quantization: str = "none"
    double_quant: bool = True
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    device: str = "cuda"
    eval_batch_size: int | None = None
    adapter_dtype: str = "fp32"
    autocast: bool = True
    padded: bool = True

    def problems(self) -> list[str]:
        found = []
        for name, limit in (("batch_size", MAX_BATCH), ("seq_len", MAX_SEQ_LEN), ("eval_batch_size", MAX_BATCH)):
            value = getattr(self, name)
            if name == "eval_batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                found.append(f"`{name}` must be a positive integer up to {limit:,}, got {str(value)[:40]}")
        for name, allowed in (
            ("dtype", DTYPES),
            ("adapter_dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("optimizer", OPTIMIZERS),
            ("attention", ATTENTION),
            ("device", DEVICES),
        ):
            if getattr(self, name) not in allowed:
                found.append(f"`{name}` must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.quantization != "none" and self.device != "cuda":
            found.append("`quantization` (bitsandbytes int8 / nf4) needs device 'cuda'")
        if self.quantization != "none" and self.dtype == "fp32":
            found.append("`quantization` computes in bf16 or fp16: set `dtype` to one of them")
        if self.dtype == "fp32" and self.adapter_dtype != "fp32":
            found.append("`adapter_dtype` must be fp32 when the base is fp32")
        if self.attention == "flash_attention_2" and self.dtype == "fp32":
            found.append("`attention` flash_attention_2 needs bf16 or fp16")
        if self.attention == "flash_attention_2" and self.device != "cuda":
            found.append("`attention` flash_attention_2 needs device 'cuda'")
        return found

    def checked(self) -> TrainSetup:
        problems = self.problems()
        if problems:
            raise MemorySetupError("; ".join(problems))
        return self


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    formula: str
    group: str  # "weights" | "adapter" | "activations" | "logits" | "process" (CPU) | "overhead" (GPU)


@dataclass(frozen=True)
class MemoryEstimate:
    """The terms at the peak of the phase that peaks (`phase`: "train" or "eval"), their sum
    `peak_bytes` (max allocated on GPU, peak RSS on CPU, where it includes the process and malloc
    terms), and what a card needs beyond it. `train_peak_bytes` / `eval_peak_bytes` compare the two
    phases without those overheads."""

    model_id: str
    settings: LoraSettings
    setup: TrainSetup
    terms: tuple[MemoryTerm, ...]
    phase: str
    train_peak_bytes: int
    eval_peak_bytes: int | None
    trainable_params: int
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        return sum(term.bytes for term in self.terms if term.group != "overhead")

    @property
    def overhead_bytes(self) -> int:
        return sum(term.bytes for term in self.terms if term.group == "overhead")

    @property
    def required_bytes(self) -> int:
        """What the device must hold: on a GPU the peak plus allocator slack plus the CUDA
        context; on the CPU the peak resident set (its overhead is already in it)."""
        if self.setup.device == "cpu":
            return self.peak_bytes
        return self.peak_bytes + self.overhead_bytes

    def fits(self, capacity_gib: float) -> bool:
        return self.required_bytes <= capacity_gib * GIB

    def table(self) -> pd.DataFrame:
        rows = [
            {"term": t.name, "group": t.group, "GiB": t.bytes / GIB, "MiB": t.bytes / MIB, "formula": t.formula}
            for t in self.terms
        ]
        return pd.DataFrame(rows, columns=["term", "group", "GiB", "MiB", "formula"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "setup": self.setup.__dict__,
            "lora": self.settings.to_peft_dict(),
            "phase": self.phase,
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "required_bytes": self.required_bytes,
            "required_gib": round(self.required_bytes / GIB, 3),
            "train_peak_bytes": self.train_peak_bytes,
            "eval_peak_bytes": self.eval_peak_bytes,
            "trainable_params": self.trainable_params,
            "terms": [t.__dict__ for t in self.terms],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Shape:
    """What the activation accounting needs of an architecture, read from the inventory."""

    layers: int
    hidden: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # per k and per v
    heads: int
    mlp_width: int  # intermediate size (of one expert for MoE)
    gated: bool
    mlp_saves: int  # T x width tensors the MLP keeps: 3 gated, 1 plain, 4 for GPT-2's Python gelu_new
    fused_qkv: bool  # one qkv projection: its output is kept beside the kernel's q, k, v copies
    routed: int  # experts a token visits (top-k) for MoE, 0 for dense
    experts: int  # experts per MoE layer, 0 for dense
    norms: int  # norms per layer on the hidden size
    norm_upcast: bool  # RMSNorm-style float32 upcast of the saved input
    vocab: int
    supported: bool  # a decoder stack of the kind the accounting knows


def estimate_memory(
    model: str | Inventory, settings: LoraSettings, setup: TrainSetup, count: CountResult | None = None
) -> MemoryEstimate:
    """Peak memory of training `settings` on `model` with `setup`. Raises `MemorySetupError` for a
    bad setup and `LoraSettingsError` for settings PEFT would refuse."""
    inv = as_inventory(model)
    setup = setup.checked()
    count = count if count is not None else count_lora_params(inv, settings)
    shape = _cached(("shape", inv.spec.key), lambda: _shape(inv))
    act = DTYPES[setup.dtype]
    notes = []
    if not shape.supported:
        notes.append(
            f"{inv.model_type}: activations are estimated as for a decoder-only stack; "
            "encoder-decoder and vision models are less exact"
        )

    static = _weight_terms(inv, count, setup) + _adapter_terms(count, setup)

    tokens = setup.batch_size * setup.seq_len
    parts = _layer_parts(shape, setup, setup.batch_size, setup.seq_len)
    layer_base = _layer_bytes(shape, parts)
    # what the LoRA terms depend on: the model, the settings (and so the count), dtypes, device, kernel
    lora_key = (inv.spec.key, settings, setup.dtype, setup.adapter_dtype, setup.autocast, setup.device, setup.attention)
    first = _cached(("first", *lora_key), lambda: _first_adapted(count))
    tracked_layers, prefix = shape.layers, 0
    if first is not None:  # layers before the first adapter need no gradient and save nothing
        tracked_layers = max(shape.layers - first[0], 0)
        prefix = _untracked_prefix(shape, parts, first[1]) if tracked_layers else 0
    per_token, fixed = _cached(
        ("lora", *lora_key), lambda: _lora_activation_bytes(count, settings, setup, shape.routed)
    )
    lora_per_layer = {layer: value * tokens + fixed.get(layer, 0) for layer, value in per_token.items()}
    lora_total = sum(lora_per_layer.values())
    logits = tokens * shape.vocab * 12
    transient = tokens * (2 * shape.mlp_width * max(shape.routed, 1) + 2 * shape.hidden) * act
    final_norm = tokens * shape.hidden * (4 if shape.norm_upcast else act) if tracked_layers else 0
    if setup.gradient_checkpointing:
        biggest_lora = max(lora_per_layer.values(), default=0)
        kept = tracked_layers * tokens * shape.hidden * act + final_norm
        activation_terms = [
            MemoryTerm(
                "activations: checkpointed layer inputs",
                kept,
                f"layers {tracked_layers} x tokens {tokens} x hidden {shape.hidden} x {act} B (+ final norm input)",
                "activations",
            ),
            MemoryTerm(
                "activations: one layer recomputed",
                (layer_base if tracked_layers else 0) + biggest_lora,
                _layer_formula(shape, setup) + " + its LoRA branches",
                "activations",
            ),
        ]
    else:
        activation_terms = [
            MemoryTerm(
                "activations: base layers",
                tracked_layers * layer_base - prefix + final_norm,
                f"layers {tracked_layers} x ({_layer_formula(shape, setup)}) + final norm input"
                + (" - what precedes the first adapter" if prefix else ""),
                "activations",
            )
        ]
        if lora_total:
            activation_terms.append(
                MemoryTerm(
                    "activations: LoRA branches",
                    lora_total,
                    _lora_formula(settings, setup),
                    "activations",
                )
            )
    logits_term = MemoryTerm(
        "logits and loss",
        logits,
        f"tokens {tokens} x vocab {shape.vocab} x 12 B (float32 log-probs, their gradient, the logits' gradient)",
        "logits",
    )
    transient_term = MemoryTerm(
        "backward working set",
        transient,
        f"tokens {tokens} x (2 x MLP width {shape.mlp_width * max(shape.routed, 1)} + 2 x hidden {shape.hidden})"
        f" x {act} B (gradients of one layer's activations)",
        "activations",
    )
    dora_terms = _dora_transient(count, settings, setup)
    quant_terms = _dequant_transient(inv, setup)
    train_terms = [*static, *activation_terms, max(logits_term, transient_term, key=lambda t: t.bytes)]
    train_terms += dora_terms + quant_terms
    train_peak = sum(t.bytes for t in train_terms)

    eval_peak = None
    eval_terms: list[MemoryTerm] = []
    if setup.eval_batch_size is not None:
        eval_tokens = setup.eval_batch_size * setup.seq_len
        eval_static = [t for t in static if t.name != "LoRA gradients"]
        eval_logits = eval_tokens * shape.vocab * (act + 8)
        eval_terms = [
            *eval_static,
            MemoryTerm(
                "evaluation logits and loss",
                eval_logits,
                f"eval tokens {eval_tokens} x vocab {shape.vocab} x ({act} B logits + 4 B float32 copy "
                "+ 4 B log-probs)",
                "logits",
            ),
            MemoryTerm(
                "evaluation working set",
                eval_tokens * (3 * shape.mlp_width * max(shape.routed, 1) + 2 * shape.hidden) * act,
                f"eval tokens {eval_tokens} x (3 x MLP width{' x top-k' if shape.routed else ''} + 2 x hidden) x {act} B"
                " (one layer, no gradients)",
                "activations",
            ),
            *quant_terms,
        ]
        eval_peak = sum(t.bytes for t in eval_terms)

    phase = "eval" if eval_peak is not None and eval_peak > train_peak else "train"
    terms = list(eval_terms if phase == "eval" else train_terms)
    static_weights = sum(t.bytes for t in terms if t.group == "weights")
    terms += _overhead_terms(setup, max(train_peak, eval_peak or 0) - static_weights)
    return MemoryEstimate(
        inv.spec.model_id,
        settings,
        setup,
        tuple(terms),
        phase,
        train_peak,
        eval_peak,
        count.trainable_params,
        tuple(notes),
    )


_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, compute):
    """Memoise what depends only on the model and the LoRA settings, so the estimate for another
    batch size or sequence length is arithmetic (the "fits on" searches make hundreds)."""
    value = _CACHE.get(key)
    if value is None:
        value = compute()
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = value
    return value


def _text_config(inv: Inventory) -> dict[str, Any]:
    config = inv.spec.config
    return config.get("text_config") or config


def _shape(inv: Inventory) -> _Shape:
    facts, config, modules = inv.facts, _text_config(inv), inv.modules
    hidden = int(facts.get("hidden_size") or 0)
    heads = int(facts.get("attention_heads") or 1)
    layer = modules[modules["layer"] == (modules.loc[modules["layer"] >= 0, "layer"].min())]

    def width(roles: Iterable[str], column: str) -> int:
        rows = layer[layer["role"].isin(tuple(roles)) & (layer["kind"] != "param")]
        return int(rows[column].iloc[0]) if len(rows) else 0

    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    q_dim = width(["attn_q"], "out_features") or heads * head_dim
    kv_heads = int(facts.get("kv_heads") or heads)
    kv_dim = width(["attn_k"], "out_features") or kv_heads * head_dim
    experts = int(facts.get("experts") or 0)
    routed = int(config.get("num_experts_per_tok") or config.get("moe_topk") or (2 if experts else 0))
    gated = bool(len(layer[layer["role"].isin(("mlp_gate", "mlp_gate_up"))])) or (
        experts > 0 and len(layer[layer["role"] == "expert"]) > 0
    )
    mlp = int(config.get("moe_intermediate_size") or 0) if experts else 0
    mlp = mlp or int(facts.get("intermediate_size") or 0) or width(["mlp_up"], "out_features") or 4 * hidden
    classes = layer["class_name"].str.lower()
    norms = int((classes.str.contains("norm") & ~layer["name"].str.contains(r"\.(?:q|k)_norm$")).sum()) or 2
    upcast = bool(classes.str.contains("rmsnorm").any())
    layers = int(facts.get("layers") or 0)
    supported = not config.get("is_encoder_decoder") and hidden > 0 and layers > 0
    activation = str(config.get("hidden_act") or config.get("activation_function") or "")
    conv1d = bool((layer["kind"] == "conv1d").any())  # GPT-2's blocks
    mlp_saves = 3 if gated else _ACTIVATION_SAVES.get((activation, conv1d), 1)
    fused = bool(len(layer[layer["role"] == "attn_qkv"])) and not len(layer[layer["role"] == "attn_q"])
    if fused:
        qkv = width(["attn_qkv"], "out_features")
        q_dim = heads * head_dim if 0 < heads * head_dim < qkv else qkv // 3
        kv_dim = (qkv - q_dim) // 2
    return _Shape(
        layers=layers,
        hidden=hidden,
        q_dim=q_dim,
        kv_dim=kv_dim,
        heads=heads,
        mlp_width=mlp,
        gated=gated,
        mlp_saves=mlp_saves,
        fused_qkv=fused,
        routed=routed if experts else 0,
        experts=experts,
        norms=norms,
        norm_upcast=upcast,
        vocab=int(facts.get("vocab_size") or 0),
        supported=supported,
    )


def _layer_parts(shape: _Shape, setup: TrainSetup, batch: int, seq: int) -> dict[str, int]:
    """Bytes autograd saves in one decoder layer without its LoRA branches: per norm, for the
    attention, for the MLP."""
    act = DTYPES[setup.dtype]
    tokens = batch * seq
    norm = tokens * (shape.hidden * (4 if shape.norm_upcast else act) + 4 * (1 if shape.norm_upcast else 2))
    # a mask (padded batches) or eager attention: transformers repeats k and v to every head
    kv = shape.q_dim if setup.padded or setup.attention == "eager" else shape.kv_dim
    if setup.attention == "flash_attention_2":
        kv = shape.kv_dim  # FlashAttention-2 takes GQA and padding (unpadded varlen) natively
    qkvo = tokens * (2 * shape.q_dim + 2 * kv) * act
    if shape.fused_qkv:
        qkvo += tokens * (shape.q_dim + 2 * shape.kv_dim) * act
    if setup.attention == "eager":
        scores = batch * shape.heads * seq * seq * (act + 4 if act != 4 else 4)
        attention = qkvo - tokens * shape.q_dim * act + scores  # q, k, v and the probabilities, no kernel output
    else:
        attention = qkvo + tokens * shape.heads * 4  # q, k, v, output + float32 log-sum-exp
        if setup.padded and setup.attention == "sdpa":
            attention += batch * seq * seq * act  # the boolean mask, converted to the dtype per call
    routed_tokens = tokens * max(shape.routed, 1)
    mlp = routed_tokens * shape.mlp_width * shape.mlp_saves * act
    if shape.routed:
        mlp += routed_tokens * shape.hidden * act + tokens * 4 * shape.experts  # routed copies, router probabilities
    return {"norm": int(norm), "attention": int(attention), "mlp": int(mlp)}


def _layer_bytes(shape: _Shape, parts: dict[str, int]) -> int:
    return shape.norms * parts["norm"] + parts["attention"] + parts["mlp"]


# where in a layer each role sits: what comes before the first adapted module saves nothing, as
# nothing there needs a gradient yet
_STAGE = {
    "attn_q": 0,
    "attn_k": 0,
    "attn_v": 0,
    "attn_qkv": 0,
    "attn_o": 1,
    "mlp_gate": 2,
    "mlp_up": 2,
    "mlp_gate_up": 2,
    "expert": 2,
    "mlp_down": 3,
}


def _untracked_prefix(shape: _Shape, parts: dict[str, int], role: str) -> int:
    stage = _STAGE.get(role, -1)
    if stage < 0:
        return 0
    prefix = parts["norm"]
    if stage >= 1:
        prefix += parts["attention"]
    if stage >= 2:
        prefix += parts["norm"] * max(shape.norms - 2, 1 if shape.norms >= 2 else 0)
    if stage >= 3:
        prefix += parts["mlp"]
    return prefix


def _first_adapted(count: CountResult) -> tuple[int, str] | None:
    """The first adapted layer and its earliest role; None when something before the blocks trains
    (an embedding adapter, modules_to_save) or nothing is adapted; (layers, "") when only modules
    after the blocks (the output head) are."""
    rows = count.modules[count.modules["layer"] >= 0]
    outside = count.modules[count.modules["layer"] < 0]
    input_side = (outside["kind"] == "embedding").any() or count.saved_module_params > 0
    if input_side or count.modules.empty:
        return None
    if rows.empty:
        return 10**9, ""
    first = int(rows["layer"].min())
    roles = rows.loc[rows["layer"] == first, "role"]
    return first, min(roles, key=lambda role: _STAGE.get(role, -1))


def _layer_formula(shape: _Shape, setup: TrainSetup) -> str:
    act = DTYPES[setup.dtype]
    norm = f"{shape.norms} norms x hidden {shape.hidden} x {4 if shape.norm_upcast else act} B"
    kv = shape.q_dim if setup.padded or setup.attention == "eager" else shape.kv_dim
    if setup.attention == "flash_attention_2":
        kv = shape.kv_dim
    if setup.attention == "eager":
        attention = f"q,k,v ({shape.q_dim}+2x{kv}) x {act} B + heads {shape.heads} x seq^2 probabilities"
    else:
        attention = f"q,k,v,out ({2 * shape.q_dim}+2x{kv}) x {act} B + log-sum-exp"
        if setup.padded and setup.attention == "sdpa":
            attention += f" + seq^2 mask x {act} B"
    mlp = f"{shape.mlp_saves} x MLP width {shape.mlp_width} x {act} B"
    if shape.routed:
        mlp = f"top-{shape.routed} x ({mlp} + hidden)"
    return f"tokens x ({norm} + {attention} + {mlp})"


# non-gated MLP activations written as Python formulas keep several intermediates (measured with
# saved_tensors_hooks: GPT-2's Conv1D MLP keeps 4 T x width tensors, phi-2's Linear MLP 3)
_ACTIVATION_SAVES = {("gelu_new", True): 4, ("gelu_new", False): 3}

_INPUT_GROUPS = {
    "attn_q": "attn_in",
    "attn_k": "attn_in",
    "attn_v": "attn_in",
    "attn_qkv": "attn_in",
    "mlp_gate": "mlp_in",
    "mlp_up": "mlp_in",
    "mlp_gate_up": "mlp_in",
}


def _lora_activation_bytes(
    count: CountResult, settings: LoraSettings, setup: TrainSetup, routed: int = 1
) -> tuple[dict, dict]:
    """Saved bytes of the LoRA branches per layer: per token, and fixed. LoRA on fused expert
    weights keeps the merged W + s B A of the whole expert stack, and each expert matmul then keeps
    its input (every token `routed` times) for the weight's gradient."""
    rows = count.modules
    if rows.empty:
        return {}, {}
    act = DTYPES[setup.dtype]
    lora = _lora_compute_bytes(setup)
    shared = setup.adapter_dtype == setup.dtype  # no cast: modules with one input share it
    mask = 1 if setup.device == "cuda" else lora  # CUDA's fused dropout keeps a bool mask, the CPU a float one
    dropout = settings.lora_dropout > 0
    per_token: dict[int, int] = {}
    fixed: dict[int, int] = {}
    for layer, group in rows.groupby("layer"):
        total, constant = 0, 0
        shared_inputs = set()
        for row in group.itertuples(index=False):
            d_in, d_out, rank = int(row.in_features), int(row.out_features), int(row.rank)
            if row.kind == "param":  # LoRA on fused expert weights (target_parameters)
                constant += max(int(row.experts), 1) * d_in * d_out * act
                total += max(routed, 1) * d_in * act
                continue
            if row.kind == "embedding":  # looks rows of A up by token id: keeps only A's output
                total += rank * lora
                continue
            if dropout:
                total += d_in * (lora + mask)  # its own dropped copy + the mask
            elif shared and row.role == "attn_o" and setup.attention != "eager":
                pass  # its input is the attention kernel's saved output
            elif shared:
                key = _INPUT_GROUPS.get(row.role, row.name)
                if key not in shared_inputs:
                    shared_inputs.add(key)
                    total += d_in * act
            else:
                total += d_in * lora  # the input cast for the adapter, per module
            total += rank * lora  # A's output, saved for B
            if settings.use_dora:
                total += 2 * d_out * lora  # base output and LoRA output, saved for the magnitude
        per_token[int(layer)] = total
        if constant:
            fixed[int(layer)] = constant
    return per_token, fixed


def _lora_compute_bytes(setup: TrainSetup) -> int:
    """Element size of the LoRA matmuls' saved inputs: autocast runs a float32 adapter in the 16-bit
    dtype; without autocast PEFT casts the input to the adapter's dtype."""
    if setup.dtype != "fp32" and setup.autocast:
        return DTYPES[setup.dtype]
    return DTYPES[setup.adapter_dtype]


def _lora_formula(settings: LoraSettings, setup: TrainSetup) -> str:
    lora = _lora_compute_bytes(setup)
    if setup.adapter_dtype == setup.dtype:
        source = "the input, shared by modules reading the same tensor"
    else:
        source = f"the input cast to {lora * 8}-bit, per module"
    parts = [f"per adapted module: tokens x d_in x {lora} B ({source})", f"tokens x r x {lora} B (A's output)"]
    if settings.lora_dropout > 0:
        mask = "1 B bool" if setup.device == "cuda" else f"{lora} B float"
        parts.append(f"its own dropped copy of the input + a tokens x d_in x {mask} mask")
    if settings.use_dora:
        parts.append(f"DoRA: 2 x tokens x d_out x {lora} B")
    return " + ".join(parts)


def _weight_terms(inv: Inventory, count: CountResult, setup: TrainSetup) -> list[MemoryTerm]:
    base = count.base_params
    dense = DTYPES[setup.dtype]
    if setup.quantization == "none":
        return [MemoryTerm("base weights", base * dense, f"{base:,} params x {dense} B ({setup.dtype})", "weights")]
    quantised, rows, _biggest = _cached(("linear", inv.spec.key), lambda: _layer_linear_sizes(inv))
    rest = base - quantised
    if setup.quantization == "nf4":
        constants = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK) if setup.double_quant else 4 / NF4_BLOCK
        per = 0.5 + constants
        label = "NF4 0.5 B + " + (
            "double-quantised absmax 1/64 B + 4/16384 B" if setup.double_quant else "float32 absmax 4/64 B"
        )
        quant = MemoryTerm(
            "base weights: 4-bit NF4 layers", int(quantised * per), f"{quantised:,} params x ({label})", "weights"
        )
    else:
        quant = MemoryTerm(
            "base weights: int8 layers",
            quantised + rows * 4,
            f"{quantised:,} params x 1 B + {rows:,} rows x 4 B scale",
            "weights",
        )
    kept = MemoryTerm(
        "base weights: not quantised",
        rest * dense,
        f"{rest:,} params (embeddings, head, norms, fused experts) x {dense} B ({setup.dtype})",
        "weights",
    )
    return [quant, kept]


def _adapter_terms(count: CountResult, setup: TrainSetup) -> list[MemoryTerm]:
    """The adapters (in `adapter_dtype`: PEFT upcasts only LoRA's own weights) and what else trains:
    modules_to_save copies (a second copy, in the base dtype) and biases (trained in place)."""
    lora_bytes, base_bytes = DTYPES[setup.adapter_dtype], DTYPES[setup.dtype]
    lora, copies, biases = count.lora_params, count.saved_module_params, count.bias_params
    trainable = lora + copies + biases
    stored = lora * lora_bytes + copies * base_bytes
    gradients = lora * lora_bytes + (copies + biases) * base_bytes
    state = OPTIMIZERS[setup.optimizer]
    if setup.optimizer in ("adamw", "sgd_momentum"):  # moments in the parameter's dtype
        optimizer = state / 4 * (lora * lora_bytes + (copies + biases) * base_bytes)
    else:
        optimizer = state * trainable
    kept = "PEFT's float32 upcast" if setup.adapter_dtype == "fp32" else setup.adapter_dtype
    extra = f" + {copies:,} modules_to_save x {base_bytes} B" if copies else ""
    moments = " (two moments per parameter, in its dtype)" if setup.optimizer == "adamw" else ""
    grads = f"{lora:,} x {lora_bytes} B" + (f" + {copies + biases:,} x {base_bytes} B" if copies + biases else "")
    return [
        MemoryTerm("LoRA parameters", stored, f"{lora:,} LoRA x {lora_bytes} B ({kept}){extra}", "adapter"),
        MemoryTerm("LoRA gradients", gradients, grads, "adapter"),
        MemoryTerm(
            f"optimizer state ({setup.optimizer})",
            int(optimizer),
            f"{trainable:,} trainable x {state:g} B{moments}",
            "adapter",
        ),
    ]


def _dora_transient(count: CountResult, settings: LoraSettings, setup: TrainSetup) -> list[MemoryTerm]:
    if not settings.use_dora or count.modules.empty:
        return []
    rows = count.modules
    biggest = int((rows["in_features"] * rows["out_features"]).max())
    return [
        MemoryTerm(
            "DoRA weight norm",
            biggest * 4 * 2,
            f"largest adapted weight {biggest:,} x 4 B x 2 (W + BA, its norm)",
            "activations",
        )
    ]


def _layer_linear_sizes(inv: Inventory) -> tuple[int, int, int]:
    """Weights, output rows and the largest weight of the Linear layers inside the blocks: what
    bitsandbytes quantises (the output head and embeddings stay in the compute dtype)."""
    modules = inv.modules
    linear = modules[modules["kind"].isin(("linear", "conv1d")) & (modules["layer"] >= 0)]  # bnb takes Conv1D too
    sizes = linear["in_features"] * linear["out_features"]
    return int(sizes.sum()), int(linear["out_features"].sum()), int(sizes.max()) if len(sizes) else 0


def _dequant_transient(inv: Inventory, setup: TrainSetup) -> list[MemoryTerm]:
    if setup.quantization == "none":
        return []
    _, _, biggest = _cached(("linear", inv.spec.key), lambda: _layer_linear_sizes(inv))
    return [
        MemoryTerm(
            "dequantised weight",
            biggest * DTYPES[setup.dtype],
            f"largest quantised layer {biggest:,} x {DTYPES[setup.dtype]} B, rebuilt for each matmul",
            "weights",
        )
    ]


def _overhead_terms(setup: TrainSetup, dynamic: int) -> list[MemoryTerm]:
    """What the device needs beyond the live peak; `dynamic` is the peak less the base weights
    (allocated once, in large blocks, so they fragment nothing)."""
    if setup.device == "cpu":
        return [
            MemoryTerm(
                "malloc slack",
                int(dynamic * CPU_ALLOCATOR_SLACK),
                f"{CPU_ALLOCATOR_SLACK:.0%} of all but the weights: glibc keeps freed blocks resident (measured)",
                "process",
            ),
            MemoryTerm(
                "Python process",
                CPU_PROCESS_BYTES,
                "interpreter + torch, transformers, PEFT and the Trainer imported (measured)",
                "process",
            ),
        ]
    return [
        MemoryTerm(
            "CUDA context and allocator slack",
            CUDA_CONTEXT_BYTES + int(dynamic * ALLOCATOR_SLACK),
            f"1 GiB context/kernels/workspaces + {ALLOCATOR_SLACK:.0%} of all but the weights for the caching "
            "allocator's reserve (neither is in max_memory_allocated)",
            "overhead",
        )
    ]


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
        return estimate_memory(inv, settings, replace(setup, **{vary: value}), count).fits(capacity_gib)

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
    from lora_core.strategies import STRATEGIES, StrategyError, resolve_strategy

    inv = as_inventory(model)
    rows = []
    for name in STRATEGIES:
        try:
            targets = resolve_strategy(inv, name)
            strategy_settings = targets.apply(settings.replace(rank_pattern={}, alpha_pattern={}))
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
