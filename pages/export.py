"""Export and import: the chosen config in the forms training stacks take, and back into the app."""

from __future__ import annotations

import streamlit as st

from lora_core import LoraSettingsError
from lora_core.export import FILE_NAMES, export, import_config
from pages.common import CUSTOM, page_state, request_apply, show_count, strategy_of, targets_text

LABELS = {
    "peft": "PEFT adapter_config.json",
    "json": "Full JSON (settings + context)",
    "axolotl": "Axolotl YAML",
    "llamafactory": "LLaMA-Factory YAML",
    "python": "Python (LoraConfig + get_peft_model)",
}
LANGUAGES = {"peft": "json", "json": "json", "axolotl": "yaml", "llamafactory": "yaml", "python": "python"}

state = page_state()
st.title("Export")
st.write(
    "The current sidebar settings, for the current model, in the form your training stack takes as is. "
    "`adapter_config.json` loads with `peft.LoraConfig.from_pretrained(folder)` and gives the count shown here."
)
show_count(state)
if state.error:
    st.stop()

tabs = st.tabs(list(LABELS.values()))
for tab, fmt in zip(tabs, LABELS):
    with tab:
        text = export(state.settings, state.inventory, fmt)
        st.code(text, language=LANGUAGES[fmt])
        st.download_button(
            f"Download {FILE_NAMES[fmt]}", text, file_name=FILE_NAMES[fmt], mime="text/plain", key=f"lx_export_{fmt}"
        )

st.subheader("Import")
st.write("Upload an `adapter_config.json` or a full JSON export: the sidebar takes its settings.")
upload = st.file_uploader("adapter_config.json", type=["json"], key="lx_import_upload", max_upload_size=1)
if upload is not None:
    try:
        settings, unknown, model = import_config(upload.getvalue().decode("utf-8", errors="replace"))
    except LoraSettingsError as error:
        st.error(f"Not imported, the current settings are kept: {error}")
    else:
        if unknown:
            st.warning(f"Ignored keys PEFT's LoraConfig does not know: {', '.join(unknown)}")
        st.json(settings.to_peft_dict(), expanded=False)
        if model:
            st.caption(f"The file names the model {model}.")
        layers = settings.layers_to_transform
        if settings.r > 256:
            st.error(f"Not imported: r={settings.r} is above the sidebar's maximum of 256.")
        elif st.button("Apply to the sidebar", key="lx_import_apply", type="primary"):
            strategy = strategy_of(settings, state.inventory)
            changes = {
                "lx_r": int(settings.r),
                "lx_alpha": float(settings.lora_alpha),
                "lx_dropout": min(float(settings.lora_dropout), 0.5),
                "lx_rslora": settings.use_rslora,
                "lx_dora": settings.use_dora,
                "lx_bias": settings.bias,
                "lx_strategy": strategy or CUSTOM,
                "lx_rank_pattern": dict(settings.rank_pattern),
                "lx_alpha_pattern": dict(settings.alpha_pattern),
                "lx_layers": (layers,) if isinstance(layers, int) else layers,
            }
            if strategy is None and settings.target_modules is not None:
                changes["lx_custom_targets"] = targets_text(settings.target_modules)
            request_apply(changes)
