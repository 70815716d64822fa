"""The estimate: every term at the peak of the phase that peaks, and what a device needs for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lora_core.counting import CountResult, count_lora_params
from lora_core.memory.formula import Formula, counted, qty, total
from lora_core.memory.layer import bnb_saved_inputs, first_adapted, layer_bytes, layer_parts, untracked_prefix
from lora_core.memory.lora import lora_layers
from lora_core.memory.setup import TrainSetup
from lora_core.memory.shape import QuantisedLinears, Shape, quantised_linears, shape_of
from lora_core.memory.terms import (
    GIB,
    MIB,
    MemoryTerm,
    adapter_terms,
    dequant_terms,
    dora_terms,
    overhead_terms,
    term,
    weight_terms,
)
from lora_core.models import Inventory, as_inventory
from lora_core.options import DTYPE_BYTES
from lora_core.settings import LoraSettings


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


def estimate_memory(
    model: str | Inventory, settings: LoraSettings, setup: TrainSetup, count: CountResult | None = None
) -> MemoryEstimate:
    """Peak memory of training `settings` on `model` with `setup`. Raises `MemorySetupError` for a
    bad setup and `LoraSettingsError` for settings PEFT would refuse."""
    inv = as_inventory(model)
    setup = setup.checked()
    count = count if count is not None else count_lora_params(inv, settings)
    shape = _cached(("shape", inv.spec.key), lambda: shape_of(inv))
    linears = _cached(("linear", inv.spec.key), lambda: quantised_linears(inv))
    notes = []
    if not shape.supported:
        notes.append(
            f"{inv.model_type}: activations are estimated as for a decoder-only stack; "
            "encoder-decoder and vision models are less exact"
        )
    static = weight_terms(count, setup, linears) + adapter_terms(count, setup)
    train_terms = [*static, *_activation_terms(inv, count, settings, setup, shape, linears)]
    train_terms += dora_terms(count, settings) + dequant_terms(setup, linears)
    train_peak = sum(t.bytes for t in train_terms)

    eval_peak = None
    eval_terms: list[MemoryTerm] = []
    if setup.eval_batch_size is not None:
        eval_static = [t for t in static if t.name != "LoRA gradients"]
        eval_terms = [*eval_static, *_eval_terms(shape, setup, setup.eval_batch_size), *dequant_terms(setup, linears)]
        eval_peak = sum(t.bytes for t in eval_terms)

    phase = "eval" if eval_peak is not None and eval_peak > train_peak else "train"
    terms = list(eval_terms if phase == "eval" else train_terms)
    static_weights = sum(t.bytes for t in terms if t.group == "weights")
    terms += overhead_terms(setup, max(train_peak, eval_peak or 0) - static_weights)
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


def _activation_terms(
    inv: Inventory,
    count: CountResult,
    settings: LoraSettings,
    setup: TrainSetup,
    shape: Shape,
    linears: QuantisedLinears,
) -> list[MemoryTerm]:
    """The saved activations of the layers, the LoRA branches and (`bnb_saves_input`) the 4-bit
    matmuls' inputs, and the larger of the loss's and one layer's backward working set."""
    tokens = qty(setup.batch_size * setup.seq_len, "tokens")
    act = qty(DTYPE_BYTES[setup.dtype], "B")
    parts = layer_parts(shape, setup)
    layer = layer_bytes(shape, parts)
    # what the LoRA terms depend on: the model, the settings (and so the count), dtypes, device, kernel
    lora_key = (inv.spec.key, settings, setup.dtype, setup.adapter_dtype, setup.autocast, setup.device, setup.attention)
    first = _cached(("first", *lora_key), lambda: first_adapted(count))
    tracked, prefix = shape.layers, None
    if first is not None:  # layers before the first adapter need no gradient and save nothing
        tracked = max(shape.layers - first[0], 0)
        prefix = untracked_prefix(shape, parts, first[1]) if tracked else None
    lora = _cached(("lora", *lora_key), lambda: lora_layers(count, settings, setup, shape.routed))
    lora_per_layer = [branch.bytes(tokens) for branch in lora.values()]
    layers = qty(tracked, "layers")
    hidden = qty(shape.hidden, "hidden")
    final_norm = None
    if tracked:
        norm_bytes = qty(4, "B (float32 upcast)") if shape.norm_upcast else act
        final_norm = (tokens * hidden * norm_bytes).note("the final norm's input")
    bnb = []
    if setup.bnb_saves_input:
        kept = {index: branch.kept_inputs for index, branch in lora.items()}
        first_role = first[1] if first is not None and tracked else None
        bnb = bnb_saved_inputs(linears, setup, range(shape.layers - tracked, shape.layers), first_role, kept)

    if setup.gradient_checkpointing:
        kept_inputs = layers * tokens * hidden * act
        recomputed = [layer] if tracked else []
        recomputed += [max(lora_per_layer, key=lambda f: f.value)] if lora_per_layer else []
        recomputed += [max(bnb, key=lambda f: f.value).note("its inputs bitsandbytes keeps")] if bnb else []
        activations = [
            term(
                "activations: checkpointed layer inputs",
                kept_inputs + final_norm if final_norm else kept_inputs,
                "activations",
            ),
            term("activations: one layer recomputed", total(recomputed), "activations"),
        ]
    else:
        base = layers * layer
        if prefix is not None:
            base = base - prefix.note("what precedes the first adapter")
        activations = [term("activations: base layers", base + final_norm if final_norm else base, "activations")]
        lora_total = total(counted(lora_per_layer, "layers"))
        if lora_total.value:
            activations.append(term("activations: LoRA branches", lora_total, "activations"))
        if bnb:
            saved = total(counted(bnb, "layers"))
            activations.append(term("activations: inputs kept by bitsandbytes", saved, "activations"))
    return [*activations, _working_set_term(shape, tokens, act)]


def _working_set_term(shape: Shape, tokens: Formula, act: Formula) -> MemoryTerm:
    """The larger of the loss's working set and one layer's backward working set."""
    width = qty(shape.mlp_width, "MLP width")
    if shape.routed:
        width = width * qty(shape.routed, "top-k")
    logits = (
        tokens
        * qty(shape.vocab, "vocab")
        * qty(12, "B").note("float32 log-probs, their gradient, the logits' gradient")
    )
    transient = (tokens * (2 * width + 2 * qty(shape.hidden, "hidden")) * act).note(
        "gradients of one layer's activations"
    )
    loss_term = term("logits and loss", logits, "logits")
    transient_term = term("backward working set", transient, "activations")
    return max(loss_term, transient_term, key=lambda t: t.bytes)


def _eval_terms(shape: Shape, setup: TrainSetup, eval_batch: int) -> list[MemoryTerm]:
    """An evaluation batch's logits and one layer's working set, without gradients."""
    tokens = qty(eval_batch * setup.seq_len, "eval tokens")
    act = DTYPE_BYTES[setup.dtype]
    logit_bytes = qty(act, "B logits") + qty(4, "B float32 copy") + qty(4, "B log-probs")
    width = qty(shape.mlp_width, "MLP width")
    if shape.routed:
        width = width * qty(shape.routed, "top-k")
    working = (tokens * (3 * width + 2 * qty(shape.hidden, "hidden")) * qty(act, "B")).note("one layer, no gradients")
    return [
        term("evaluation logits and loss", tokens * qty(shape.vocab, "vocab") * logit_bytes, "logits"),
        term("evaluation working set", working, "activations"),
    ]


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
