"""What each module does in a transformer, read from its name across architectures.

Roles: attn_q, attn_k, attn_v, attn_qkv (fused), attn_o, mlp_gate, mlp_up, mlp_gate_up (fused),
mlp_down, router, expert, embedding, head, other. Names follow the conventions of the
transformers model files (Llama q_proj..down_proj, GPT-2 c_attn/c_proj/c_fc, BERT
query/key/value/dense, T5 q/k/v/o/wi/wo, DistilBERT q_lin/lin1, OPT fc1/fc2, Phi dense, ...).
"""

from __future__ import annotations

ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o")
MLP_ROLES = ("mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down", "expert")

_ATTENTION_PARENTS = ("attn", "attention", "selfattention", "encdecattention", "self_attn", "crossattention", "mixer")
_MLP_PARENTS = (
    "mlp",
    "ffn",
    "feed_forward",
    "densereludense",
    "intermediate",
    "feedforward",
    "moe",
    "block_sparse_moe",
)

_LEAF_ROLES = {
    "q_proj": "attn_q",
    "query": "attn_q",
    "q_lin": "attn_q",
    "wq": "attn_q",
    "k_proj": "attn_k",
    "key": "attn_k",
    "k_lin": "attn_k",
    "wk": "attn_k",
    "v_proj": "attn_v",
    "value": "attn_v",
    "v_lin": "attn_v",
    "wv": "attn_v",
    "c_attn": "attn_qkv",
    "qkv_proj": "attn_qkv",
    "query_key_value": "attn_qkv",
    "wqkv": "attn_qkv",
    "w_pack": "attn_qkv",
    "qkv": "attn_qkv",
    "o_proj": "attn_o",
    "out_proj": "attn_o",
    "out_lin": "attn_o",
    "gate_proj": "mlp_gate",
    "w1": "mlp_gate",
    "wi_0": "mlp_gate",
    "up_proj": "mlp_up",
    "w3": "mlp_up",
    "wi_1": "mlp_up",
    "fc1": "mlp_up",
    "c_fc": "mlp_up",
    "wi": "mlp_up",
    "lin1": "mlp_up",
    "dense_h_to_4h": "mlp_up",
    "fc_in": "mlp_up",
    "gate_up_proj": "mlp_gate_up",
    "down_proj": "mlp_down",
    "w2": "mlp_down",
    "fc2": "mlp_down",
    "lin2": "mlp_down",
    "dense_4h_to_h": "mlp_down",
    "fc_out": "mlp_down",
}


def classify_role(name: str, kind: str, is_output_embedding: bool) -> str:
    """The role of module `name` of inventory kind `kind` (see module docstring)."""
    if is_output_embedding:
        return "head"
    if kind == "embedding":
        return "embedding"
    if kind == "other":
        return "router" if _is_router(name) else "other"
    parts = name.lower().split(".")
    leaf = parts[-1]
    parents = parts[:-1]
    if kind == "param":
        if "expert" in name.lower():
            return "expert"
        return "router" if _is_router(name) else "other"
    if _is_router(name):
        return "router"
    in_attention = any(p in _ATTENTION_PARENTS for p in parents)
    in_mlp = any(p in _MLP_PARENTS for p in parents)
    if in_mlp and "experts" in parents:
        return "expert"
    if leaf in ("o", "wo"):
        return "attn_o" if in_attention and not in_mlp else "mlp_down"
    if leaf in ("q", "k", "v"):
        return f"attn_{leaf}"
    if leaf in ("c_proj", "dense", "proj"):
        return _projection_role(parents, in_attention, in_mlp)
    role = _LEAF_ROLES.get(leaf)
    if role:
        return role
    return "other"


def _projection_role(parents: list[str], in_attention: bool, in_mlp: bool) -> str:
    # GPT-2 `attn.c_proj` / `mlp.c_proj`; BERT `attention.output.dense` / `intermediate.dense` /
    # `output.dense` (the FFN's down projection); Phi `self_attn.dense`.
    if in_attention:
        return "attn_o"
    if "intermediate" in parents:
        return "mlp_up"
    if in_mlp or (parents and parents[-1] == "output"):
        return "mlp_down"
    return "other"


def _is_router(name: str) -> bool:
    parts = name.lower().split(".")
    leaf = parts[-1] if parts[-1] != "weight" else parts[-2]
    return leaf in ("router", "gate") and any(p in _MLP_PARENTS for p in parts[:-1])
