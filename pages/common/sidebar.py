"""The sidebar of every page: the model picker and the LoRA settings, each field checked by the
engine as it is edited (a bad value shows one line under its field and changes nothing else)."""

from __future__ import annotations

import streamlit as st

import lora_core
from lora_core.errors import InputError
from lora_core.models import local_model_roots
from lora_core.options import BIASES
from lora_core.strategies import STRATEGIES
from pages.common.fields import CUSTOM, DROPOUT_MAX, ENGINE_FIELDS, R_MAX, SIDEBAR_DEFAULTS, field_problem
from pages.common.links import write_link
from pages.common.state import current
from pages.common.uploads import file_upload, read_upload


def render_sidebar() -> None:
    """The model picker and the LoRA settings, in the sidebar of every page."""
    with st.sidebar:
        st.subheader("Model")
        _model_picker()
        st.subheader("LoRA settings")
        st.slider("Rank r", 1, R_MAX, key="lx_r", help="LoRA rank: lora_A is r x in, lora_B is out x r")
        _accept("lx_r")
        st.number_input(
            "Alpha (lora_alpha)",
            min_value=None,
            max_value=None,
            step=1.0,
            format="%g",
            key="lx_alpha",
            help="any number > 0",
        )
        _accept("lx_alpha")
        st.slider("Dropout (lora_dropout)", 0.0, DROPOUT_MAX, step=0.01, key="lx_dropout")
        _accept("lx_dropout")
        st.selectbox("Target modules", [*STRATEGIES, CUSTOM], key="lx_strategy")
        if st.session_state["lx_strategy"] == CUSTOM:
            st.text_input(
                "Custom targets",
                key="lx_custom_targets",
                help="comma-separated names (q_proj, v_proj), 'all-linear', or re:REGEX for a regex",
            )
            _accept("lx_custom_targets")
        st.toggle("rsLoRA (alpha / sqrt(r))", key="lx_rslora")
        st.toggle("DoRA", key="lx_dora")
        st.selectbox("Bias", BIASES, key="lx_bias")
        for key in SIDEBAR_DEFAULTS.keys() - ENGINE_FIELDS.keys():
            if key in st.session_state:  # widgets whose every value is valid: taken as they are
                st.session_state["lx_ok"][key] = st.session_state[key]
        if st.session_state.get("lx_url_notice"):
            st.warning(st.session_state["lx_url_notice"])
        write_link(st.query_params, st.session_state)
        _sidebar_download()


def _accept(key: str) -> None:
    """Take the value of sidebar field `key` into the settings when the engine accepts it; else
    say why, in one line under the field, and keep using the last accepted value."""
    value = st.session_state[key]
    problem = field_problem(key, value)
    if problem is None:
        st.session_state["lx_ok"][key] = value
        return
    kept = st.session_state["lx_ok"][key]
    st.error(f"{problem}: still using {kept:g}" if isinstance(kept, float) else f"{problem}: still using {kept}")


def _sidebar_download() -> None:
    """The current settings as a PEFT adapter_config.json, one click from every page."""
    from lora_core.export import export

    state = current()
    if state.error:
        return
    st.download_button(
        "Download adapter_config.json",
        export(state.settings, state.inventory, "peft"),
        file_name="adapter_config.json",
        mime="application/json",
        key="lx_sidebar_download",
    )


def _model_picker() -> None:
    source = st.radio(
        "Source", ["Catalogue", "Hub id or path", "Upload config.json"], horizontal=False, key="lx_source"
    )
    if source == "Catalogue":
        choice = st.selectbox("Catalogue model", lora_core.catalogue_ids(), key="lx_catalogue_choice")
        if choice != st.session_state["lx_spec"].model_id:
            _try_set_model(lambda: lora_core.resolve_model(choice))
    elif source == "Hub id or path":
        name = st.text_input("Hub id, model folder or config.json path", key="lx_model_text")
        if st.button("Load model", key="lx_load"):
            # the server's policy for local paths ($LORA_EXPLORER_MODEL_ROOTS): outside it, one answer
            _try_set_model(lambda: lora_core.resolve_model(name, local_roots=local_model_roots()))
    else:
        upload = file_upload("config.json", "lx_upload")
        if upload is not None and upload.file_id != st.session_state.get("lx_upload_seen"):
            st.session_state["lx_upload_seen"] = upload.file_id
            _try_set_model(lambda: _spec_from_upload(upload))
    if st.session_state.get("lx_model_error"):
        st.error(st.session_state["lx_model_error"])
    st.caption(f"Current: **{st.session_state['lx_spec'].model_id}**")


def _spec_from_upload(upload) -> lora_core.ModelSpec:
    checked = read_upload("lx_upload", upload)
    return lora_core.spec_from_text(checked.data, checked.name)


def _try_set_model(load) -> None:
    """Switch model only when the new one resolves and builds; otherwise keep the current one."""
    try:
        spec = load()
        lora_core.inventory(spec)
    except InputError as error:
        st.session_state["lx_model_error"] = f"{error} (keeping {st.session_state['lx_spec'].model_id})"
        return
    st.session_state["lx_model_error"] = None
    st.session_state["lx_spec"] = spec
