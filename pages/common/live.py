"""The live views' metric cursor: each poll reads only the points written since the last one."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lora_core.store import Store


def follow_metrics(store: Store, run_ids: list[int], key: str) -> dict[int, tuple[int, pd.DataFrame | None]]:
    """Each run's newest `seq` (0 before any point) and its metric rows (None before any). They are
    held in this session under `key` and topped up with only the rows written since the last poll:
    one index range per run, whatever the store holds. Runs not asked for are dropped, so a session
    holds only what it shows."""
    held = st.session_state.get(key, {})
    held = {run_id: held.get(run_id, (0, None)) for run_id in run_ids}
    new = store.metrics_since({run_id: seq for run_id, (seq, _) in held.items()})
    for run_id, rows in new.groupby("run_id"):
        frame = rows if held[run_id][1] is None else pd.concat([held[run_id][1], rows])
        frame = frame.drop_duplicates(["kind", "step"], keep="last").sort_values(["kind", "step"])
        held[run_id] = (int(rows["seq"].max()), frame)
    st.session_state[key] = held
    return held
