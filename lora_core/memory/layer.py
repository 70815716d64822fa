"""What autograd saves in one decoder layer, without its LoRA branches, and which layers save it.

A frozen Linear saves no input (its weight gets no gradient), so the base projections cost nothing;
what is saved per layer is the input of each norm (RMSNorm upcasts it to float32, and keeps a
float32 statistic per token), the attention kernel's q, k, v, output and log-sum-exp (SDPA /
FlashAttention; eager attention keeps the seq x seq probabilities instead of the output), and the
MLP's activation input, activation output and up projection (gated MLPs) or the activation input
(plain MLPs). Checked against `torch.autograd.graph.saved_tensors_hooks` in tests/test_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_core.counting import CountResult
from lora_core.memory.formula import Formula, qty, total
from lora_core.memory.setup import TrainSetup
from lora_core.memory.shape import QuantisedLinears, Shape
from lora_core.options import DTYPE_BYTES

# Where in a layer each role sits: what comes before the first adapted module saves nothing, as
# nothing there needs a gradient yet.
STAGE = {
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

# Modules that read the same tensor: the attention's q, k, v and the MLP's gate and up.
INPUT_GROUPS = {
    "attn_q": "q,k,v",
    "attn_k": "q,k,v",
    "attn_v": "q,k,v",
    "attn_qkv": "q,k,v",
    "mlp_gate": "gate,up",
    "mlp_up": "gate,up",
    "mlp_gate_up": "gate,up",
}


@dataclass(frozen=True)
class LayerParts:
    """The saved bytes of one layer: per norm, for the attention, for the MLP."""

    norm: Formula
    attention: Formula
    mlp: Formula


def layer_parts(shape: Shape, setup: TrainSetup) -> LayerParts:
    """The `LayerParts` of one layer of `shape` trained with `setup`."""
    act = qty(DTYPE_BYTES[setup.dtype], "B")
    batch, seq = setup.batch_size, setup.seq_len
    tokens = qty(batch * seq, "tokens")
    hidden = qty(shape.hidden, "hidden")
    if shape.norm_upcast:
        norm = tokens * (hidden * qty(4, "B (float32 upcast)") + qty(4, "B (float32 rstd)"))
    else:
        norm = tokens * (hidden * act + qty(8, "B (float32 mean and rstd)"))
    return LayerParts(norm, _attention(shape, setup, tokens, act), _mlp(shape, tokens, hidden, act))


def _attention(shape: Shape, setup: TrainSetup, tokens: Formula, act: Formula) -> Formula:
    batch, seq = qty(setup.batch_size, "batch"), qty(setup.seq_len, "seq")
    # a mask (padded batches) or eager attention: transformers repeats k and v to every head;
    # FlashAttention-2 takes GQA and padding (unpadded varlen) natively
    repeated = (setup.padded or setup.attention == "eager") and setup.attention != "flash_attention_2"
    kv = shape.q_dim if repeated else shape.kv_dim
    q, k, v = qty(shape.q_dim, "q"), qty(kv, "k"), qty(kv, "v")
    if setup.attention == "eager":
        attention = tokens * (q + k + v) * act
    else:
        attention = tokens * (q + qty(shape.q_dim, "out") + k + v) * act
    if shape.fused_qkv:
        fused = (qty(shape.q_dim, "q") + qty(shape.kv_dim, "k") + qty(shape.kv_dim, "v")).note("the fused projection")
        attention = attention + tokens * fused * act
    if setup.attention == "eager":
        element = DTYPE_BYTES[setup.dtype]
        probabilities = (
            qty(4, "B (float32 softmax)")
            if element == 4
            else qty(element, "B probabilities") + qty(4, "B (float32 softmax)")
        )
        return attention + batch * qty(shape.heads, "heads") * seq * seq * probabilities
    attention = attention + tokens * qty(shape.heads, "heads") * qty(4, "B (float32 log-sum-exp)")
    if setup.padded and setup.attention == "sdpa":
        attention = attention + (batch * seq * seq * act).note("the mask, converted to the dtype per call")
    return attention


def _mlp(shape: Shape, tokens: Formula, hidden: Formula, act: Formula) -> Formula:
    routed = tokens * qty(shape.routed, "top-k") if shape.routed else tokens
    mlp = routed * qty(shape.mlp_width, "MLP width") * qty(shape.mlp_saves, "tensors") * act
    if shape.routed:
        copies = (routed * hidden * act).note("routed copies")
        router = (tokens * qty(4, "B") * qty(shape.experts, "experts")).note("router probabilities")
        mlp = mlp + copies + router
    return mlp


def layer_bytes(shape: Shape, parts: LayerParts) -> Formula:
    """All a layer saves: its norms, its attention and its MLP."""
    return qty(shape.norms, "norms") * parts.norm + parts.attention + parts.mlp


def untracked_prefix(shape: Shape, parts: LayerParts, role: str) -> Formula | None:
    """What the first adapted layer computes before its first adapted module (`role`), which
    saves nothing; None when that is nothing."""
    stage = STAGE.get(role, -1)
    if stage < 0:
        return None
    prefix = [parts.norm]
    if stage >= 1:
        prefix.append(parts.attention)
    later_norms = max(shape.norms - 2, 1 if shape.norms >= 2 else 0)
    if stage >= 2 and later_norms:
        prefix.append(parts.norm if later_norms == 1 else qty(later_norms, "norms") * parts.norm)
    if stage >= 3:
        prefix.append(parts.mlp)
    return total(prefix)


def first_adapted(count: CountResult) -> tuple[int, str] | None:
    """The first adapted layer and its earliest role; None when something before the blocks trains
    (an embedding adapter, modules_to_save) or nothing is adapted; (10**9, "") when only modules
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
    return first, min(roles, key=lambda role: STAGE.get(role, -1))


def bnb_saved_inputs(
    linears: QuantisedLinears,
    setup: TrainSetup,
    layers: range,
    first_role: str | None,
    kept: dict[int, frozenset[str]],
) -> list[Formula]:
    """Per layer in `layers`: the inputs of its 4-bit matmuls that bitsandbytes before 0.43.2
    kept for backward (`ctx.tensors = (A, B)` in `MatMul4Bit.forward`), less those already kept:
    the attention kernel's output (o_proj's input under SDPA / FlashAttention) and the inputs
    LoRA branches keep uncast and undropped (`kept`). In the first layer, when `first_role` names
    its first adapted module, inputs up to that module need no gradient, so nothing keeps them."""
    tokens = qty(setup.batch_size * setup.seq_len, "tokens")
    act = qty(DTYPE_BYTES[setup.dtype], "B")
    inputs: dict[str, tuple[int, int]] = {}  # input -> (width, stage)
    for role, name, width in linears.block:
        if role == "attn_o" and setup.attention != "eager":
            continue  # the kernel's saved output, viewed
        inputs.setdefault(INPUT_GROUPS.get(role, name), (width, STAGE.get(role, -1)))
    per_layer = []
    for index, layer in enumerate(layers):
        after = STAGE.get(first_role, -1) if index == 0 and first_role is not None else -2
        widths = [
            qty(width, f"{key} input")
            for key, (width, stage) in inputs.items()
            if stage > after and key not in kept.get(layer, frozenset())
        ]
        per_layer.append(tokens * total(widths, "") * act)
    return per_layer
