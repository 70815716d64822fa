"""Process-wide objects shared by every session: the training queue and the simulation devices."""

from __future__ import annotations

import streamlit as st

from lora_core import simulate
from lora_core.runner import RunManager
from lora_core.store import Store, default_data_dir


def run_manager() -> RunManager:
    """The process-wide training queue over the run store ($LORA_EXPLORER_DATA or the user data dir)."""
    return _run_manager(str(default_data_dir()))


@st.cache_resource
def _run_manager(data_dir: str) -> RunManager:
    return RunManager(Store.open(data_dir))


@st.cache_resource
def simulation_device() -> str:
    """The device simulations run on (CUDA, then MPS, then CPU), named for people."""
    return simulate.device_description()


@st.cache_resource
def rank_sweep_device() -> str:
    """The device the rank simulation runs on (as `simulation_device`, but the CPU for MPS, which
    has no float64), named for people."""
    return simulate.device_description(simulate.rank_sweep_device())
