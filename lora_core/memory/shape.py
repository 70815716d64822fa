"""What the activation accounting needs of an architecture, read from its module inventory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lora_core.models import Inventory

# Non-gated MLP activations written as Python formulas keep several T x width intermediates:
# GPT-2's Conv1D MLP (gelu_new) keeps 4, phi-2's Linear MLP with the same activation 3.
_ACTIVATION_SAVES = {("gelu_new", True): 4, ("gelu_new", False): 3}


@dataclass(frozen=True)
class Shape:
    """The sizes of one decoder layer and of the stack."""

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


def shape_of(inv: Inventory) -> Shape:
    """The `Shape` of `inv`'s first decoder layer and stack."""
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
    return Shape(
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


@dataclass(frozen=True)
class QuantisedLinears:
    """The Linear (and GPT-2 Conv1D) layers inside the blocks, which bitsandbytes quantises (the
    output head and embeddings stay in the compute dtype): their weights, output rows and largest
    weight, and one block's (role, name, input width) rows."""

    params: int
    rows: int
    biggest: int
    block: tuple[tuple[str, str, int], ...]


def quantised_linears(inv: Inventory) -> QuantisedLinears:
    """`QuantisedLinears` of `inv`."""
    modules = inv.modules
    linear = modules[modules["kind"].isin(("linear", "conv1d")) & (modules["layer"] >= 0)]
    sizes = linear["in_features"] * linear["out_features"]
    first = linear[linear["layer"] == linear["layer"].min()] if len(linear) else linear
    block = tuple(
        (str(row.role), block_name(str(row.name), int(row.layer)), int(row.in_features))
        for row in first.itertuples(index=False)
    )
    return QuantisedLinears(
        int(sizes.sum()), int(linear["out_features"].sum()), int(sizes.max()) if len(sizes) else 0, block
    )


def block_name(name: str, layer: int) -> str:
    """`name` from its layer index on ("model.layers.3.mlp.fc1" -> "mlp.fc1")."""
    marker = f".{layer}."
    return name.split(marker, 1)[1] if marker in name else name


def _text_config(inv: Inventory) -> dict[str, Any]:
    config = inv.spec.config
    return config.get("text_config") or config
