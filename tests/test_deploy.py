"""What a served instance gets: the Docker image's settings and the fresh-machine CI script."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_image_limits_local_model_paths() -> None:
    """The image binds 0.0.0.0: without a root, anyone reaching it could probe the server's disk
    through the model field."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"LORA_EXPLORER_MODEL_ROOTS=/models\b", dockerfile)
    assert "0.0.0.0" in dockerfile


def test_the_image_carries_the_server_upload_cap() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(entry.strip("/").startswith(".streamlit") for entry in ignored)
    assert "maxUploadSize" in (ROOT / ".streamlit" / "config.toml").read_text()


def test_ci_starts_from_empty_caches() -> None:
    """A warm cache hid a fresh machine's failure once: CI points every cache and data directory
    at new empty folders."""
    script = (ROOT / ".ci" / "run").read_text()
    for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "LORA_EXPLORER_CACHE", "LORA_EXPLORER_DATA", "HF_HOME"):
        assert re.search(rf"export {variable}=", script), variable


def test_the_package_declares_its_command_data_and_pins() -> None:
    """`pip install .` (checked by hand in a fresh venv: `lora-explorer count ...` works) relies on
    these three declarations; a renamed entry point or a catalogue outside the package data would
    only show up on a user's machine."""
    import importlib
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, function = project["project"]["scripts"]["lora-explorer"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    setuptools = project["tool"]["setuptools"]
    assert setuptools["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    shipped = {
        path for pattern in setuptools["package-data"]["lora_core"] for path in (ROOT / "lora_core").glob(pattern)
    }
    data_files = {path for path in (ROOT / "lora_core").rglob("*") if path.suffix in (".json", ".toml")}
    assert data_files <= shipped, "a data file the package reads but a wheel would leave out"
    assert (ROOT / "lora_core" / "advisor" / "evidence.toml") in shipped
    assert len(shipped) >= 21
