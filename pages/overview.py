"""Overview: the model's facts, the current config's count, and the module inventory."""

from __future__ import annotations

import streamlit as st

import lora_core
from lora_core.errors import InputError
from lora_core.strategies import SCENARIOS, adapt_to_model, describe_targets
from pages.common import apply_settings, human, page_state, role_breakdown, show_count, simulation_device

state = page_state()
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

st.subheader("Scenario recipes (article In[21])")
st.write("Starting points from practitioner experience, counted on this model; **Apply** sets the sidebar.")
for name, scenario in SCENARIOS.items():
    recipe, note = adapt_to_model(scenario["settings"], state.inventory)
    cols = st.columns([3, 2, 2, 1])
    cols[0].markdown(f"**{name.replace('_', ' ')}**  \n{scenario['description']}")
    cols[1].markdown(
        f"r={recipe.r}, alpha={recipe.lora_alpha}, dropout={recipe.lora_dropout}  \n`{describe_targets(recipe.target_modules)}`"
    )
    try:
        counted = lora_core.count_lora_params(state.inventory, recipe)
        cols[2].metric("trainable", f"{counted.trainable_params:,}", help=note or None)
    except InputError as error:
        cols[2].error(str(error))
    if cols[3].button("Apply", key=f"lx_apply_{name}"):
        apply_settings(recipe, state.inventory)

st.caption(f"Simulations on the Rank, Alpha and Dropout pages run on: **{simulation_device()}**.")
