"""Memory: will this LoRA run fit? Peak training memory term by term, and what fits on common GPUs."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from lora_core import options
from lora_core.memory import GIB, GPUS_GIB, MemorySetupError, TrainSetup, estimate_memory, fits_table, strategy_table
from pages.common import add_markers, hline, page_state, show_count, vline


@st.cache_data(max_entries=64, show_spinner=False)
def cached_fits(_inventory, _count, key: str, settings_json: str, setup: TrainSetup):
    return fits_table(_inventory, _count.settings, setup, count=_count)


@st.cache_data(max_entries=64, show_spinner=False)
def cached_strategies(_inventory, key: str, settings_json: str, _settings, setup: TrainSetup):
    return strategy_table(_inventory, _settings, setup)


state = page_state()
st.title("Memory")
st.write(
    "Peak training memory of the current model and LoRA config: the base weights as stored (QLoRA's NF4 "
    "with its quantisation constants), the adapters with their gradients and optimizer state, what autograd "
    "saves for backward (read from the model's modules: norms, attention kernel, MLP, each LoRA branch and its "
    "dropout), and the loss over the vocabulary. On a GPU the peak is what `torch.cuda.max_memory_allocated()` "
    "reports; the card also needs the CUDA context and the allocator's reserve."
)
show_count(state)
if state.result is None:
    st.stop()

left, middle, right = st.columns(3)
with left:
    batch = st.number_input("Batch size (per device)", 1, 4096, 4, key="lx_mem_batch")
    seq = st.number_input("Sequence length (tokens)", 1, 1 << 20, 1024, step=128, key="lx_mem_seq")
    device = st.radio("Device", options.MEMORY_DEVICES, horizontal=True, key="lx_mem_device")
with middle:
    dtype = st.selectbox("Base dtype", options.DTYPES, key="lx_mem_dtype")
    quantization = st.selectbox(
        "Base quantisation",
        options.QUANTIZATIONS,
        format_func=options.QUANTIZATION_LABELS.get,
        key="lx_mem_quant",
    )
    double_quant = st.toggle("Double quantisation (QLoRA)", value=True, key="lx_mem_double_quant")
    bnb_saves_input = quantization == "nf4" and st.toggle(
        "bitsandbytes before 0.43.2",
        key="lx_mem_bnb_saves_input",
        help="Versions 0.39 to 0.43.1 kept every 4-bit matmul's input for backward: 1.6 GB more on Llama-2-7B "
        "at 1,304 tokens",
    )
with right:
    optimizer = st.selectbox(
        "Optimizer",
        options.OPTIMIZERS,
        format_func=options.OPTIMIZER_LABELS.get,
        key="lx_mem_optimizer",
    )
    attention = st.selectbox("Attention", options.ATTENTIONS, key="lx_mem_attention")
    checkpointing = st.toggle("Gradient checkpointing", key="lx_mem_checkpointing")
with st.expander("More: evaluation pass, adapter dtype, autocast"):
    col1, col2, col3 = st.columns(3)
    eval_batch = col1.number_input("Evaluation batch (0: none)", 0, 4096, 0, key="lx_mem_eval_batch")
    adapter_dtype = col2.selectbox(
        "Adapter dtype",
        ("fp32", *(d for d in options.DTYPES if d != "fp32")),
        key="lx_mem_adapter_dtype",
        help="PEFT upcasts adapters to fp32",
    )
    autocast = col3.toggle("Mixed precision (autocast)", value=True, key="lx_mem_autocast")

setup = TrainSetup(
    batch_size=int(batch),
    seq_len=int(seq),
    dtype=dtype,
    quantization=quantization,
    double_quant=double_quant,
    bnb_saves_input=bnb_saves_input,
    optimizer=optimizer,
    gradient_checkpointing=checkpointing,
    attention=attention,
    device=device,
    eval_batch_size=int(eval_batch) or None,
    adapter_dtype=options.adapter_dtype_for(dtype, adapter_dtype),
    autocast=autocast,
)
try:
    estimate = estimate_memory(state.inventory, state.settings, setup, state.result)
except MemorySetupError as error:
    st.error(f"Change the setup: {error}")
    st.stop()

col1, col2, col3 = st.columns(3)
col1.metric(
    f"Peak ({estimate.phase})",
    f"{estimate.peak_bytes / GIB:.2f} GiB",
    help="max_memory_allocated on a GPU; peak resident set on the CPU",
)
col2.metric("Needs on the device", f"{estimate.required_bytes / GIB:.2f} GiB")
col3.metric("Tokens per step", f"{setup.batch_size * setup.seq_len:,}")
for note in estimate.notes:
    st.info(note)

table = estimate.table()
bar = go.Figure()
for row in table.itertuples(index=False):
    bar.add_trace(go.Bar(y=["estimate"], x=[row.GiB], name=row.term, hovertext=row.formula, orientation="h"))
bar.update_layout(
    barmode="stack", xaxis_title="GiB", height=300, legend={"orientation": "h", "y": -0.35}, margin={"t": 30}
)
if setup.device == "cuda":
    visible = [gib for gib in GPUS_GIB if gib <= max(estimate.required_bytes / GIB * 1.6, 24)]
    add_markers(bar, *(vline(gib, f"{gib} GiB", "top right") for gib in visible))
st.plotly_chart(bar, key="lx_mem_bar")
st.dataframe(
    table[["term", "GiB", "formula"]],
    hide_index=True,
    key="lx_mem_table",
    column_config={"GiB": st.column_config.NumberColumn(format="%.3f")},
)

st.subheader("Fits on")
if setup.device == "cpu":
    st.caption("The GPU table is for device cuda.")
else:
    fits = cached_fits(state.inventory, state.result, state.spec.key, state.settings.to_json(), setup)
    st.dataframe(
        fits,
        hide_index=True,
        key="lx_mem_fits",
        column_config={"headroom GiB": st.column_config.NumberColumn(format="%.1f")},
    )
    st.caption(
        f"Largest batch at {setup.seq_len:,} tokens, and longest sequence at batch {setup.batch_size}, "
        "that fit each card (0: not even 1). Cards by their nominal size, taken as GiB usable."
    )

    st.subheader("Target-module strategies side by side")
    strategies = cached_strategies(state.inventory, state.spec.key, state.settings.to_json(), state.settings, setup)
    usable = strategies[strategies["error"] == ""] if "required GiB" in strategies else strategies.iloc[0:0]
    if usable.empty:
        st.warning(f"No target-module strategy maps onto {state.spec.model_id}'s modules.")
        st.stop()
    compare = go.Figure(go.Bar(x=usable["strategy"], y=usable["required GiB"], text=usable["required GiB"].round(1)))
    add_markers(compare, *(hline(gib, f"{gib} GiB") for gib in GPUS_GIB if gib <= usable["required GiB"].max() * 1.3))
    compare.update_layout(yaxis_title="needs GiB", height=360)
    st.plotly_chart(compare, key="lx_mem_strategies_chart")
    st.dataframe(
        strategies,
        hide_index=True,
        key="lx_mem_strategies",
        column_config={
            "required GiB": st.column_config.NumberColumn(format="%.2f"),
            "activations GiB": st.column_config.NumberColumn(format="%.2f"),
        },
    )
st.caption(
    "Checked against what autograd saves in real models, published GPU measurements (torchtune, PEFT, "
    "bitsandbytes QLoRA) and this app's own CPU runs: see the README for each error. The Fine-tune page shows "
    "each run's measured peak next to its estimate."
)
