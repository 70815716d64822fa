"""Right-size: the smallest ranks that keep a chosen share of each update's energy, and the
truncated adapter, written so that PEFT loads it as it is.

By Eckart-Young, the best rank-k approximation of an update in the Frobenius norm keeps its top k
singular triples, and its relative error is sqrt(sum of the dropped s_i^2 / sum of all s_i^2).
Each kept update is written back as B' = U_k sqrt(S_k) / sqrt(scale), A' = sqrt(S_k) V_k^T / sqrt(scale)
(the square root splits the spectrum evenly, as PEFT's own SVD initialisations do), with each
module's alpha set so PEFT's scale (alpha / r, rsLoRA alpha / sqrt(r)) stays what it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from lora_core.errors import one_line, short_repr
from lora_core.inspect.loading import CONFIG_NAME, WEIGHTS_NAME, Adapter, AdapterError
from lora_core.inspect.spectra import Inspection, Module, adapter_modules, factors, open_weights, spectrum

Mode = Literal["global", "per_module"]


@dataclass(frozen=True)
class RightSize:
    """A truncation plan: `ranks` maps PEFT module names to their new rank; `modules` has one row
    per update (`name`, `module`, `r`, `new_r`, `relative_error`, the Frobenius error relative to
    the update's norm); `relative_error` is that of all updates together; `r`, `rank_pattern`
    describe the config the truncated adapter gets."""

    energy: float
    mode: Mode
    ranks: dict[str, int]
    modules: pd.DataFrame
    relative_error: float
    r: int
    parameters_before: int
    parameters_after: int


def plan_right_size(inspection: Inspection, energy: float, mode: Mode = "per_module") -> RightSize:
    """The ranks keeping `energy` (0 < energy <= 1) of each update's squared spectrum: per module,
    or one global rank (the largest any update needs, so every update keeps at least `energy`).
    The experts of a fused parameter share one rank (the largest they need). Never above the
    configured r, never below 1 (PEFT's smallest rank)."""
    if not (isinstance(energy, float | int) and math.isfinite(energy) and 0 < energy <= 1):
        raise AdapterError(f"the energy to keep must be a number in (0, 1], e.g. 0.99; got {energy!r}")
    frame = inspection.modules
    if frame.empty:
        raise AdapterError("the adapter has no LoRA updates to right-size")
    need = {name: _rank_for(inspection.spectra[name], energy) for name in frame["name"]}
    per_module = frame.assign(need=frame["name"].map(need)).groupby("module")["need"].max()
    if mode == "global":
        per_module[:] = int(per_module.max())
    elif mode != "per_module":
        raise AdapterError(f"the right-size mode must be global or per_module, got {mode!r}")
    configured = frame.groupby("module")["r"].first()
    ranks = {m: int(max(1, min(per_module[m], configured[m]))) for m in per_module.index}
    new_r = frame["module"].map(ranks)
    errors, dropped, total = [], 0.0, 0.0
    for name, keep in zip(frame["name"], new_r):
        squared = inspection.spectra[name].astype(np.float64) ** 2
        lost, energy_all = float(squared[keep:].sum()), float(squared.sum())
        errors.append(math.sqrt(lost / energy_all) if energy_all > 0 else 0.0)
        dropped, total = dropped + lost, total + energy_all
    table = frame[["name", "module", "r"]].assign(new_r=new_r.to_numpy(), relative_error=errors)
    size = (frame["d_out"] + frame["d_in"]).to_numpy()
    return RightSize(
        energy=float(energy),
        mode=mode,
        ranks=ranks,
        modules=table,
        relative_error=math.sqrt(dropped / total) if total > 0 else 0.0,
        r=_most_common(ranks),
        parameters_before=int((size * frame["r"].to_numpy()).sum()),
        parameters_after=int((size * new_r.to_numpy()).sum()),
    )


def _rank_for(singular: np.ndarray, energy: float) -> int:
    squared = singular.astype(np.float64) ** 2
    total = squared.sum()
    if total <= 0:
        return 1
    return int(min(np.searchsorted(np.cumsum(squared) / total, energy - 1e-12) + 1, len(singular)))


def _most_common(ranks: dict[str, int]) -> int:
    values, counts = np.unique(list(ranks.values()), return_counts=True)
    return int(values[counts.argmax()])


def check_out_dir(out_dir: Path | str) -> Path:
    """`out_dir` as a Path when the truncated adapter may go there: a new folder or an empty one,
    never a file or a folder holding anything (another adapter, the source itself, a user's files),
    so nothing is ever overwritten. Raises `AdapterError` in one line."""
    if not str(out_dir).strip():
        raise AdapterError("give a folder for the truncated adapter")
    if "\x00" in str(out_dir):
        raise AdapterError(f"{short_repr(str(out_dir))} cannot be a folder: it holds a NUL character")
    out = Path(out_dir)
    shown = short_repr(str(out_dir))
    try:
        out = out.expanduser()
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise AdapterError(f"{shown} is a file or a link: give a new folder for the truncated adapter")
        if out.is_dir() and any(out.iterdir()):
            raise AdapterError(f"{shown} exists and is not empty: give a new folder for the truncated adapter")
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise AdapterError(f"{shown} cannot be made: {short_repr(str(parent))} is a file, not a folder")
    except AdapterError:
        raise
    except (OSError, ValueError, RuntimeError) as error:  # a NUL, a name too long, no such user for ~
        raise AdapterError(f"{shown} cannot be a folder here: {_reason(error)}") from None
    return out


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else one_line(error)


def write_right_sized(adapter: Adapter, plan: RightSize, out_dir: Path | str) -> Path:
    """Write the truncated adapter (adapter_config.json + adapter_model.safetensors) to `out_dir`
    and return it. Tensors other than the LoRA factors (DoRA magnitudes, saved embeddings, biases)
    are copied unchanged. Modules are read one at a time, but the new file is assembled in memory
    (it is at most the original's size). `out_dir` must be new or empty (`check_out_dir`); a folder
    that cannot be written is one `AdapterError` line, and what was half written is removed."""
    from safetensors.torch import save_file

    out = check_out_dir(out_dir)
    modules = adapter_modules(adapter)
    missing = {m.module for m in modules} - set(plan.ranks)
    if missing:
        raise AdapterError(f"the plan was made for another adapter: it has no rank for {sorted(missing)[0]}")
    written = {}
    with open_weights(adapter) as reader:
        lora_keys = {key for m in modules for key in (m.a_key, m.b_key)}
        for key in adapter.tensors:
            if key not in lora_keys:
                written[key] = reader.get_tensor(key)
        for module in modules:
            written |= _truncated(module, reader, plan.ranks[module.module], adapter.label)
    config = json.dumps(right_sized_config(adapter.config, modules, plan), indent=2)
    out = check_out_dir(out)  # again: the folder may have filled while the factors were computed
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(written, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(config)
    except AdapterError:
        raise
    except (OSError, ValueError) as error:  # a read-only place, a parent that is a file, a full disk
        if made:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                with contextlib.suppress(OSError):
                    (out / name).unlink(missing_ok=True)
        raise AdapterError(
            f"{short_repr(str(out_dir))}: the truncated adapter cannot be written there ({_reason(error)})"
        ) from None
    return out


def _truncated(module: Module, reader, keep: int, label: str) -> dict:
    """The new lora_A / lora_B tensors of `module` at rank `keep`, in the file's dtype and layout."""
    import torch

    a_old, b_old = reader.get_tensor(module.a_key), reader.get_tensor(module.b_key)
    new_a, new_b = [], []
    for b, a in factors(module, reader, label):
        found = spectrum(b, a, module.scale, vectors=True)
        k = min(keep, len(found.singular))
        # alpha 0 makes every update zero: its factors are written as zeros (and alpha' stays 0), not 0 / 0.
        rescale = 1 / abs(module.scale) if module.scale else 0.0
        root = torch.from_numpy(np.sqrt(found.singular[:k] * rescale))
        sign = math.copysign(1.0, module.scale)  # a negative alpha keeps its sign on B
        b_k = torch.zeros(b.shape[0], keep, dtype=torch.float64)
        a_k = torch.zeros(keep, a.shape[1], dtype=torch.float64)
        b_k[:, :k] = sign * found.left[:, :k] * root  # (d_out, keep)
        a_k[:k] = root[:, None] * found.right[:, :k].T  # (keep, d_in)
        new_b.append(b_k)
        new_a.append(a_k)
    if module.kind == "experts":
        a_new = torch.stack(new_a).reshape(module.experts * keep, -1)  # expert-major rows, as PEFT stacks them
        b_new = torch.stack(new_b, dim=2).reshape(b_old.shape[0], keep * module.experts)  # rank-major columns
    else:
        a_new = new_a[0].reshape(keep, *a_old.shape[1:])
        b_new = new_b[0].reshape(b_old.shape[0], keep, *b_old.shape[2:])
    return {
        module.a_key: a_new.to(a_old.dtype).contiguous(),
        module.b_key: b_new.to(b_old.dtype).contiguous(),
    }


def right_sized_config(config: dict, modules: list[Module], plan: RightSize) -> dict:
    """`config` with the plan's ranks: `r` the most common new rank, `rank_pattern` the modules
    that differ from it, and alphas chosen so every module keeps its scale: alpha' = scale * r'
    (rsLoRA: scale * sqrt(r')); `lora_alpha` the most common, `alpha_pattern` the rest.
    Pattern keys are full module names, which PEFT's `get_pattern_key` matches only to themselves."""
    rslora = bool(config.get("use_rslora", False))
    alphas = {}
    for module in modules:
        rank = plan.ranks[module.module]
        alphas[module.module] = module.scale * (math.sqrt(rank) if rslora else rank)
    alpha_values = list(alphas.values())
    lora_alpha = max(set(alpha_values), key=alpha_values.count)
    new = dict(config)
    new["r"] = plan.r
    new["rank_pattern"] = {m: rank for m, rank in plan.ranks.items() if rank != plan.r}
    new["lora_alpha"] = _plain(lora_alpha)
    new["alpha_pattern"] = {m: _plain(a) for m, a in alphas.items() if a != lora_alpha}
    return new


def _plain(value: float) -> float | int:
    """An alpha as JSON writes it most plainly: 16, not 16.0."""
    return int(value) if float(value).is_integer() else float(value)
