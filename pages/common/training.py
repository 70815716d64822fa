"""What the training forms (Fine-tune, Experiments) share: the model and dataset choices, each
checked the same way before anything is queued, and the run name rule. Every check raises
`InputError` in one line; nothing here changes what the user typed."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import lora_core
from lora_core.datasets import BUILTIN_TASKS, hub_dataset_id, parse_upload
from lora_core.embedded import EMBEDDED, config_name
from lora_core.errors import InputError, name_problem
from lora_core.models import local_model_roots
from lora_core.strategies import settings_on_model
from pages.common.state import Current, sidebar_strategy
from pages.common.uploads import Upload, file_upload, read_upload

MODEL_SOURCES = ["Embedded SmolLM2-135M-Instruct", "Hub id or local path"]
BUILTIN, UPLOAD, HUB = "Built-in task", "Upload JSONL/CSV", "Hub dataset id"
DATA_SOURCES = [BUILTIN, UPLOAD, HUB]


def training_model(source: str, text: str) -> str:
    """The model a run trains: the embedded one, or a Hub id / local folder that resolves under
    this server's policy for local paths ($LORA_EXPLORER_MODEL_ROOTS). Raises `InputError`."""
    if source == MODEL_SOURCES[0]:
        return EMBEDDED
    name = text.strip()
    if not name:
        raise InputError("give a Hub id or a local folder for the model, or pick the embedded model")
    lora_core.resolve_model(name, local_roots=local_model_roots())  # a config that cannot resolve cannot train
    return name


def training_settings(state: Current, model_choice: str) -> tuple[lora_core.LoraSettings, str]:
    """The sidebar's settings with its target strategy mapped onto the training model's module
    names, and a note saying onto which (or why not)."""
    strategy = sidebar_strategy()
    if strategy is None:
        return state.settings, ""
    name = config_name(model_choice)
    try:
        inv = lora_core.inventory(lora_core.resolve_model(name, local_roots=local_model_roots()))
        settings, _ = settings_on_model(state.settings, strategy, inv)
    except InputError as error:
        return state.settings, f"could not map {strategy} onto {name}: {error}"
    return settings, f"{strategy} on {name}"


def chosen_dataset(source: str, task: str, upload_key: str, upload, hub_text: str) -> tuple[str, Upload | None]:
    """The dataset a form names: a built-in task, a checked upload (stored with `store_upload`
    once the run is accepted; the dataset is then "upload:<stored path>"), or "hub:<repo id>".
    Raises `InputError` in one line."""
    if source == UPLOAD:
        if upload is None:
            raise InputError("choose a JSONL or CSV file to upload")
        checked = read_upload(upload_key, upload)
        parse_upload(checked.data, checked.name)  # DatasetError (an InputError) names the problem
        return f"upload:{checked.name}", checked
    if source == HUB:
        return f"hub:{hub_dataset_id(hub_text)}", None
    return task, None


def store_upload(checked: Upload, data_dir: Path) -> Path:
    """Write a checked upload to <data dir>/uploads/<content hash><checked suffix> (once: same
    bytes, same file). The client's file name is only ever shown, never used as a path."""
    folder = data_dir / "uploads"
    path = folder / checked.stored_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            partial = path.with_suffix(".part")
            partial.write_bytes(checked.data)
            partial.replace(path)
    except OSError as error:
        raise InputError(f"{checked.name} could not be stored on the server ({error.strerror or error})") from None
    return path


def run_name(text: str, what: str = "a run name") -> str | None:
    """A name as typed, stripped; None for an empty one. Raises `InputError` for one a table cannot
    show as typed (`errors.name_problem`)."""
    name = text.strip()
    if problem := name_problem(name, what):
        raise InputError(problem)
    return name or None


def dataset_fields(prefix: str, where=None) -> tuple[str, str, object, str]:
    """The dataset radio, built-in task, upload and Hub id fields (keys `<prefix>_data_source`,
    `_task`, `_upload`, `_hub_dataset`) in container `where`: (source, task, upload, hub id text)."""
    where = where or st
    source = where.radio("Dataset", DATA_SOURCES, key=f"{prefix}_data_source")
    task = where.selectbox(
        "Built-in task", list(BUILTIN_TASKS), key=f"{prefix}_task", format_func=lambda t: f"{t}: {BUILTIN_TASKS[t][1]}"
    )
    upload = file_upload("JSONL or CSV", f"{prefix}_upload", where=where)
    hub_text = where.text_input("Hub dataset id", key=f"{prefix}_hub_dataset")
    return source, task, upload, hub_text
