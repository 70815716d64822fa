"""Display helpers shared by the pages: the headline count, per-role sums, short numbers."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import lora_core
from lora_core.guidelines import alpha_advice
from lora_core.options import DTYPE_BYTES
from lora_core.strategies import describe_targets
from pages.common.state import Current


def show_count(state: Current) -> None:
    """The headline numbers for the current config, or the validation error."""
    if state.error:
        st.error(state.error)
        return
    result = state.result
    cols = st.columns(4)
    cols[0].metric("Trainable parameters", f"{result.trainable_params:,}")
    cols[1].metric("% of all parameters", f"{result.percent_trainable:.4f}%")
    cols[2].metric("Adapted modules", f"{len(result.modules):,}")
    cols[3].metric("Adapter size (bf16)", f"{result.trainable_params * DTYPE_BYTES['bf16'] / 1e6:,.1f} MB")
    st.caption(f"Targets: `{describe_targets(state.settings.target_modules, state.settings.target_parameters)}`")
    if state.target_note:
        st.caption(state.target_note)
    for warning in result.warnings:
        st.warning(warning)
    advice = alpha_advice(state.settings)
    if advice:
        st.warning(advice)


def role_breakdown(result: lora_core.CountResult) -> pd.DataFrame:
    """Per-role sums of the per-module table."""
    return (
        result.modules.groupby("role", as_index=False)
        .agg(modules=("name", "size"), params=("params", "sum"))
        .sort_values("params", ascending=False)
    )


def human(count: int) -> str:
    """1234567 -> '1.23M'."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.2f}{suffix}"
    return str(count)
