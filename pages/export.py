"""Export and import: the chosen config in the forms training stacks take, and back into the app."""

from __future__ import annotations

from pathlib import PurePosixPath

import streamlit as st

from lora_core.errors import InputError, one_line
from lora_core.export import FILE_NAMES, FORMATS, export, import_config
from pages.common import file_upload, page_state, read_upload, request_apply, show_count, sidebar_changes

LABELS = {
    "peft": "PEFT adapter_config.json",
    "json": "Full JSON (settings + context)",
    "axolotl": "Axolotl YAML",
    "llamafactory": "LLaMA-Factory YAML",
    "python": "Python (LoraConfig + get_peft_model)",
}
# The code block's highlighting, by the suffix of the format's file name.
LANGUAGES = {".json": "json", ".yaml": "yaml", ".py": "python"}


def read_import(data: bytes):
    """`import_config(data)` plus the PEFT dict it shows: (settings, unknown keys, model, dict).

    Raises `InputError` in one line. PEFT's LoraConfig validates the fields it carries verbatim
    (`eva_config`, `layer_replication`, ...) only when built, so it is built here, and its
    refusal (TypeError, ValueError) or a structure nested too deeply becomes that line."""
    try:
        settings, unknown, model = import_config(data)
        try:
            peft = settings.to_peft_dict()
            hash(settings)  # the pages cache by settings
        except InputError:
            raise
        except (TypeError, ValueError) as error:
            raise InputError(f"PEFT's LoraConfig refuses it ({one_line(error)})") from None
    except RecursionError:
        raise InputError("the JSON is nested too deeply for an adapter config") from None
    return settings, unknown, model, peft


state = page_state()
st.title("Export")
st.write(
    "The current sidebar settings, for the current model, in the form your training stack takes as is. "
    "`adapter_config.json` loads with `peft.LoraConfig.from_pretrained(folder)` and gives the count shown here."
)
show_count(state)
if not state.error:  # nothing to export; importing other settings stays possible
    tabs = st.tabs([LABELS[fmt] for fmt in FORMATS])
    for tab, fmt in zip(tabs, FORMATS):
        with tab:
            text = export(state.settings, state.inventory, fmt)
            st.code(text, language=LANGUAGES[PurePosixPath(FILE_NAMES[fmt]).suffix])
            st.download_button(
                f"Download {FILE_NAMES[fmt]}",
                text,
                file_name=FILE_NAMES[fmt],
                mime="text/plain",
                key=f"lx_export_{fmt}",
            )

st.subheader("Import")
st.write("Upload an `adapter_config.json` or a full JSON export: the sidebar takes its settings.")
upload = file_upload("adapter_config.json", "lx_import_upload")
if upload is not None:
    try:
        settings, unknown, model, peft = read_import(read_upload("lx_import_upload", upload).data)
        changes, left_out = sidebar_changes(settings, state.inventory)
    except InputError as error:
        st.error(f"Not imported, the current settings are kept: {error}")
    else:
        if unknown:
            st.warning(f"Ignored keys PEFT's LoraConfig does not know: {', '.join(unknown)}")
        if left_out:
            st.warning(f"Apply leaves out what the sidebar has no place for: {', '.join(left_out)}")
        st.json(peft, expanded=False)
        if model:
            st.caption(f"The file names the model {model}.")
        if st.button("Apply to the sidebar", key="lx_import_apply", type="primary"):
            request_apply(changes)
