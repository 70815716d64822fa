"""What a finished run leaves: the adapter files as a zip, and how much of its rank it used."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from lora_core.settings import lora_scale

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


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
    """Singular values of each adapted module's scaled update `scale * B @ A`.

    The update has rank <= r, so its spectrum comes from the r x r core: with B = Q_B R_B and
    A^T = Q_A R_A (thin QR), B A = Q_B (R_B R_A^T) Q_A^T, whose singular values are those of
    R_B R_A^T. Returns (summary, spectra): `summary` one row per module with `rank`, `scale`,
    `effective_rank` (components holding `energy` of the squared spectrum), `entropy_rank`
    (exp of the spectral entropy, Roy & Vetterli 2007) and `top_singular`; `spectra` the values.
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = tensor.float()
    summary, spectra = [], []
    for module, pair in sorted(pairs.items()):
        if {"A", "B"} - set(pair) or pair["A"].dim() != 2:
            continue
        a, b = pair["A"], pair["B"]  # (r, in), (out, r)
        rank = a.shape[0]
        scale = _scale(config, module, rank)
        r_b = torch.linalg.qr(b).R
        r_a = torch.linalg.qr(a.T).R
        singular = torch.linalg.svdvals(r_b @ r_a.T).double().numpy() * scale
        summary.append({"module": module, "rank": rank, "scale": scale, **_rank_measures(singular, energy)})
        spectra += [{"module": module, "index": i + 1, "singular_value": float(v)} for i, v in enumerate(singular)]
    return pd.DataFrame(summary), pd.DataFrame(spectra)


def _scale(config: dict, module: str, rank: int) -> float:
    """The scale PEFT gives `module` under the adapter_config.json dict `config`: its alpha is the
    first `alpha_pattern` key PEFT's `get_pattern_key` matches, else `lora_alpha`."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), config.get("lora_alpha", 8))
    return lora_scale(rank, alpha, bool(config.get("use_rslora")))


def _rank_measures(singular: np.ndarray, energy: float) -> dict:
    squared = singular**2
    total = squared.sum()
    if total <= 0:
        return {"effective_rank": 0, "entropy_rank": 0.0, "top_singular": 0.0}
    cumulative = np.cumsum(squared) / total
    p = singular / singular.sum()
    p = p[p > 0]
    return {
        "effective_rank": int(np.searchsorted(cumulative, energy) + 1),
        "entropy_rank": float(np.exp(-(p * np.log(p)).sum())),
        "top_singular": float(singular[0]),
    }
