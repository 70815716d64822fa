"""What a finished run leaves: the adapter files as a zip, and how much of its rank it used."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd


def adapter_zip(adapter_dir: str | Path) -> bytes:
    """`adapter_model.safetensors` + `adapter_config.json` (and any other file there) as a zip."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                archive.write(path, path.name)
    return buffer.getvalue()


def effective_ranks(adapter_dir: str | Path, energy: float = 0.9) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Singular values of each adapted update `scale * B @ A` of the adapter in `adapter_dir`, from
    the inspector's engine (`lora_core.inspect`). Returns (summary, spectra): `summary` one row per
    update with `module`, `rank` (its r), `scale`, `effective_rank` (components holding `energy` of
    the squared spectrum), `entropy_rank` (exp of the spectral entropy, Roy & Vetterli 2007) and
    `top_singular`; `spectra` the values by `module` and `index`. Raises `AdapterError` (an
    `InputError`) for a folder that is not a readable LoRA adapter."""
    from lora_core.inspect import adapter_modules, check_adapter, energy_column, inspect_adapter
    from lora_core.inspect.loading import LORA_KEY

    folder = Path(adapter_dir)
    adapter = check_adapter(folder, str(folder))
    inspection = inspect_adapter(adapter, (energy,))
    frame = inspection.modules
    if frame.empty:
        return pd.DataFrame(columns=_SUMMARY), pd.DataFrame(columns=["module", "index", "singular_value"])
    # Rows keep the names the file gives the modules (`base_model.model....`), as this table always has.
    saved = {m.module: LORA_KEY.match(m.a_key)["module"] for m in adapter_modules(adapter)}  # type: ignore[index]
    names = {row.name: saved[row.module] + row.name[len(row.module) :] for row in frame.itertuples()}
    summary = frame.assign(
        module=frame["name"].map(names), rank=frame["r"], effective_rank=frame[energy_column(energy)]
    )[_SUMMARY]
    spectra = pd.DataFrame(
        [
            {"module": names[name], "index": i + 1, "singular_value": float(value)}
            for name, values in inspection.spectra.items()
            for i, value in enumerate(values)
        ]
    )
    return summary.reset_index(drop=True), spectra


_SUMMARY = ["module", "rank", "scale", "effective_rank", "entropy_rank", "top_singular"]
