"""Overview: the model's facts, the current config's count, and the module inventory."""

from __future__ import annotations

import streamlit as st

from pages.common import current, human, role_breakdown, show_count

state = current()
st.title("LoRA Explorer")
st.write(
    "Choose LoRA hyperparameters with evidence: every count below is what "
    "`peft.get_peft_model(model, LoraConfig(...)).get_nb_trainable_parameters()` returns for this model."
)

facts = state.inventory.facts
cols = st.columns(5)
cols[0].metric("Model type", facts["model_type"] or "?")
cols[1].metric("Layers", facts["layers"])
cols[2].metric("Hidden size", facts["hidden_size"] or "?")
cols[3].metric("FFN size", facts["intermediate_size"] or "?")
cols[4].metric("Total parameters", human(state.inventory.total_params), help=f"{state.inventory.total_params:,}")
st.caption(
    f"Built as `{state.inventory.model_class}` on the meta device (no weights). "
    f"Attention heads: {facts['attention_heads']}, KV heads: {facts['kv_heads'] or facts['attention_heads']}, "
    f"vocabulary: {facts['vocab_size'] or '?'}" + (f", experts: {facts['experts']}" if facts["experts"] else "")
)

st.subheader(f"Current config on {state.spec.model_id}")
show_count(state)

if state.result is not None:
    st.dataframe(role_breakdown(state.result), hide_index=True, key="lx_overview_roles")

st.subheader("Module inventory")
table = state.inventory.modules
adaptable = table[table["kind"] != "other"][
    ["name", "kind", "class_name", "layer", "role", "in_features", "out_features"]
]
st.dataframe(adaptable, hide_index=True, key="lx_overview_inventory")
