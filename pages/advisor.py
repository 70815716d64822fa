"""Advisor: a recommended LoRA config for the sidebar's model, a dataset and a GPU, with the
evidence for each choice; Apply it to the sidebar, Export it, or Verify it with an experiment."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from lora_core.advisor import PRIORITIES, READS, TASKS, Advice, Case, advise, load_evidence, show
from lora_core.advisor.measure import LONGEST_QUANTILE
from lora_core.advisor.verify import verify_grid, verify_plan, verify_verdict
from lora_core.datasets import BUILTIN_TASKS, parse_upload
from lora_core.errors import InputError
from lora_core.experiments import ranked, results, submit_experiment
from lora_core.export import export
from lora_core.memory import GIB, GPUS_GIB
from lora_core.store import WORKER
from lora_core.training.config import EMBEDDED, TrainConfig
from pages.common import (
    MODEL_SOURCES,
    R_MAX,
    apply_settings,
    chosen_dataset,
    config_name,
    dataset_fields,
    display_name,
    file_upload,
    page_state,
    read_upload,
    run_manager,
    store_upload,
    training_model,
)

NUMBERS, MEASURE_UPLOAD, MEASURE_BUILTIN = "Numbers", "Measure an upload", "Measure a built-in task"

state = page_state()
st.title("Advisor")
st.write(
    "A config for **your** model, data and GPU, from published measurements: each choice names the claims it "
    "stands on, how far your case is from what they measured, and the alternatives. Then check it: "
    "**Verify** trains the advice and its neighbours on your data."
)


@st.cache_resource(show_spinner="Loading the embedded tokenizer...")
def embedded_tokenizer():
    from lora_core.advisor.measure import load_tokenizer

    return load_tokenizer(EMBEDDED)


@st.cache_data(max_entries=32, show_spinner=False)
def measured(data: bytes | None, name: str):
    """A dataset's size and tokens, counted with the embedded model's tokenizer."""
    from lora_core.advisor.measure import measure_dataset
    from lora_core.training.data import load_dataset

    dataset = parse_upload(data, name) if data is not None else load_dataset(name)
    return measure_dataset(dataset, embedded_tokenizer())


@st.cache_data(max_entries=64, show_spinner="Weighing the evidence...")
def cached_advice(spec_key: str, _inventory, case_fields: tuple) -> Advice:
    """The advice for the sidebar's model (`spec_key` identifies it; the inventory is not hashed)."""
    return advise(Case(_inventory, *case_fields))


# The form's values outlive its widgets: Streamlit forgets a widget's value when a run does not draw
# it (another page, the numbers hidden while a file is measured); the copy here brings it back.
FORM_DEFAULTS = {
    "lx_adv_task": "sft",
    "lx_adv_gpu": 24.0,
    "lx_adv_priority": "quality",
    "lx_adv_source": NUMBERS,
    "lx_adv_examples": 2000,
    "lx_adv_completion": 256.0,
    "lx_adv_prompt": 0.0,
    "lx_adv_builtin": next(iter(BUILTIN_TASKS)),
}
kept = st.session_state.setdefault("lx_adv_kept", dict(FORM_DEFAULTS))
for key, value in kept.items():
    st.session_state.setdefault(key, value)

col1, col2, col3 = st.columns(3)
task = col1.selectbox("Task", list(TASKS), format_func=TASKS.get, key="lx_adv_task")
gpu = col2.number_input("GPU memory (GiB)", 1.0, 4096.0, step=1.0, key="lx_adv_gpu", help=f"common: {GPUS_GIB}")
priority = col3.radio("What matters most", list(PRIORITIES), horizontal=True, key="lx_adv_priority")
source = st.radio("Dataset", [NUMBERS, MEASURE_UPLOAD, MEASURE_BUILTIN], horizontal=True, key="lx_adv_source")
col1, col2, col3 = st.columns(3)
seq_len, share = None, None
if source == NUMBERS:
    examples = col1.number_input("Training examples", 1, 10**10, key="lx_adv_examples")
    completion = col2.number_input("Mean completion tokens", 1.0, 1e6, key="lx_adv_completion")
    prompt = col3.number_input("Mean prompt tokens", 0.0, 1e6, key="lx_adv_prompt")
else:
    if source == MEASURE_UPLOAD:
        upload = file_upload("JSONL or CSV", "lx_adv_upload")
        if upload is None:
            st.info("Choose a JSONL or CSV file: the app counts its examples and tokens.")
            st.stop()
        try:
            checked = read_upload("lx_adv_upload", upload)
            numbers = measured(checked.data, checked.name)
        except InputError as error:
            st.error(f"Cannot measure {display_name(upload.name)}: {error}")
            st.stop()
    else:
        builtin = col1.selectbox("Built-in task", list(BUILTIN_TASKS), key="lx_adv_builtin")
        try:
            numbers = measured(None, builtin)
        except InputError as error:  # the embedded tokenizer missing or broken
            st.error(f"Cannot measure {builtin}: {error}")
            st.stop()
    examples, completion, prompt = numbers.examples, numbers.completion_tokens, numbers.prompt_tokens
    seq_len, share = numbers.long_tokens, LONGEST_QUANTILE
    st.caption(
        f"Measured {numbers.name}: {examples:,} examples, mean {prompt:.1f} prompt and {completion:.1f} completion "
        f"tokens (the embedded model's tokenizer); {LONGEST_QUANTILE:.0%} fit in {seq_len:,} tokens."
    )

kept.update({key: st.session_state[key] for key in FORM_DEFAULTS if key in st.session_state})
try:
    advice = cached_advice(
        state.spec.key,
        state.inventory,
        (task, int(examples), float(completion), float(prompt), float(gpu), priority, seq_len, share),
    )
except InputError as error:
    st.error(f"No advice: {error}")
    st.stop()

settings, training = advice.settings, advice.training
need = advice.estimate.required_bytes / GIB
col1, col2, col3, col4 = st.columns(4)
col1.metric("Trainable parameters (exact)", f"{advice.count.trainable_params:,}")
col2.metric("Share of the model", f"{100 * advice.count.trainable_params / max(advice.count.all_params, 1):.2f}%")
col3.metric("Peak memory (estimated)", f"{need:.1f} GiB")
col4.metric(f"On your {gpu:g} GiB GPU", "fits" if advice.fits else "does not fit")
for warning in advice.warnings:
    st.warning(warning)
if not advice.fits:
    st.error(advice.choice("memory").rule)

st.subheader(f"Recommended for {advice.model_id}")
config_rows = [
    ("target modules", advice.choice("targets").value),
    ("r", settings.r),
    ("lora_alpha", show(settings.lora_alpha)),
    ("use_rslora", settings.use_rslora),
    ("lora_dropout", show(settings.lora_dropout)),
    ("learning rate", show(training.learning_rate)),
    ("epochs", training.epochs),
    (
        "micro-batch x accumulation",
        f"{training.micro_batch} x {training.grad_accumulation} = {training.effective_batch}",
    ),
    ("sequence length", training.seq_len),
    ("steps", f"{training.steps:,}"),
    ("memory setup", advice.choice("memory").value),
]
st.dataframe(pd.DataFrame(config_rows, columns=["field", "value"]).astype(str), hide_index=True, key="lx_adv_config")

evidence = load_evidence()
st.subheader("Why: each choice and its evidence")
for choice in advice.choices:
    with st.expander(f"**{choice.name}** = {choice.value}", expanded=choice.name in ("r", "learning_rate")):
        st.write(choice.rule)
        for claim_id in choice.claims:
            claim = evidence[claim_id]
            st.markdown(f"- `{claim_id}` ({READS[claim.read]}): {claim.says}  \n  *{claim.source}*, `{claim.ref}`; "
                        f"measured on: {claim.conditions}")  # fmt: skip
        if choice.article:
            st.info(f"The article says: {choice.article}")
        if choice.distance:
            st.caption("Your case vs the conditions: " + " | ".join(choice.distance))
        for alternative in choice.alternatives:
            st.markdown(f"- Alternative **{alternative.value}**: {alternative.when} ({', '.join(alternative.claims)})")

st.subheader("Use it")
col1, col2, col3 = st.columns(3)
if col1.button("Apply to the sidebar", key="lx_adv_apply", disabled=settings.r > R_MAX):
    apply_settings(settings, state.inventory)
if settings.r > R_MAX:
    col1.caption(f"r={settings.r} is above the sidebar's maximum of {R_MAX}: export it instead.")
col2.download_button(
    "Export adapter_config.json",
    export(settings, state.inventory, "peft"),
    file_name="adapter_config.json",
    mime="application/json",
    key="lx_adv_export",
)
col3.download_button(
    "Export the advice (JSON)",
    json.dumps(advice.to_json(), indent=2),
    file_name="lora-advice.json",
    mime="application/json",
    key="lx_adv_export_json",
)


def _unfinished(experiment_id: int) -> bool:
    experiment = run_manager().store.experiment(experiment_id)
    return experiment is not None and experiment["status"] in ("queued", "running")


st.subheader("Verify: train the advice and its neighbours")
grid = verify_grid(advice)
runs = len(grid[0].split(",")) * len(grid[1].split(","))
st.write(
    f"An experiment of {runs} short runs, `{grid[0]}` x `{grid[1]}`, on the embedded model or your own, with your "
    "data or a built-in task. Short runs check the direction of the advice on your data, not its final quality."
)
LENGTHS = [64, 128, 256, 512, 1024, 2048]
with st.form("lx_adv_verify_form"):
    col1, col2, col3, col4 = st.columns(4)
    model_source = col1.radio("Model", MODEL_SOURCES, key="lx_adv_model_source")
    model_text = col1.text_input("Hub id or local path", key="lx_adv_model_text")
    data_source, builtin_task, data_upload, hub_text = dataset_fields("lx_advv", col2)
    steps = col3.number_input("Steps per run", 1, 2000, 30, key="lx_adv_steps")
    batch = col3.select_slider("Batch size", [1, 2, 4, 8], value=4, key="lx_adv_batch")
    # the advised length where a short run can afford it; longer sequences are for the real run
    fitting = [n for n in LENGTHS if n <= training.seq_len] or LENGTHS[:1]
    verify_len = col4.select_slider("Sequence length", LENGTHS, value=fitting[-1], key="lx_adv_seq")
    verify = st.form_submit_button("Verify", type="primary", key="lx_adv_verify")
verifying = st.session_state.get("lx_adv_verifying")
asked = (
    model_source, model_text.strip(), data_source, builtin_task, getattr(data_upload, "file_id", None), hub_text,
    int(steps), int(batch), int(verify_len), settings.r, training.learning_rate,
)  # fmt: skip
if verify and verifying and verifying[3] == asked and _unfinished(verifying[0]):
    st.warning(f"This is already being verified as experiment {verifying[0]}: see below.")
elif verify:
    try:
        model_choice = training_model(model_source, model_text)
        from lora_core.models import as_inventory
        from lora_core.strategies import resolve_strategy

        target = as_inventory(config_name(model_choice))
        mapped = resolve_strategy(target, advice.choice("targets").value).apply(settings)
        dataset, checked = chosen_dataset(data_source, builtin_task, "lx_advv_upload", data_upload, hub_text)
        manager = run_manager()
        if checked is not None:  # stored once the rest holds; trials name the stored file
            verify_plan(advice, TrainConfig(model=model_choice, steps=int(steps)), mapped)
            dataset = f"upload:{store_upload(checked, manager.store.data_dir)}"
        config = TrainConfig(
            model=model_choice, dataset=dataset, steps=int(steps), batch_size=int(batch), seq_len=int(verify_len)
        )
        plan = verify_plan(advice, config, mapped)
        experiment_id = submit_experiment(manager.store, plan, runner="local", owner=WORKER)
    except InputError as error:
        st.error(f"Not started: {error}")
    else:
        st.session_state["lx_adv_verifying"] = (experiment_id, advice.settings.r, advice.training.learning_rate, asked)
        st.success(f"Experiment {experiment_id} queued ({len(plan.trials)} runs): follow it here or on Experiments.")

verifying = st.session_state.get("lx_adv_verifying")
if verifying:
    experiment_id, r, lr, _ = verifying

    @st.fragment(run_every=3)
    def verification() -> None:
        store = run_manager().store
        experiment = store.experiment(experiment_id)
        if experiment is None:
            st.info(f"Experiment {experiment_id} was deleted.")
            return
        trials = results(store, experiment_id)
        ranking = ranked(trials)
        st.write(f"Experiment {experiment_id}: **{experiment['status']}**")
        errors = [error for error in trials.get("error", []) if isinstance(error, str) and error]
        if ranking.empty and errors:
            st.error(f"Its trials failed: {errors[0]}")
            return
        if (r, lr) != (advice.settings.r, advice.training.learning_rate):
            st.caption(f"It verified r={r}, lr={show(lr)}: the advice has changed since.")
        st.write(verify_verdict(r, lr, ranking))
        if not ranking.empty:
            st.dataframe(ranking, hide_index=True, key="lx_adv_ranking")

    verification()
