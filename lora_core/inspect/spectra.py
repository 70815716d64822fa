"""The spectrum of each adapted weight's update `scale * B @ A`, without ever forming B A.

With thin QR factorisations B = Q_B R_B and A^T = Q_A R_A, B A = Q_B (R_B R_A^T) Q_A^T, so the
nonzero singular values of the (d_out x d_in) update are those of the (r x r) core R_B R_A^T, and
its singular vectors are Q_B U and Q_A V from the core's SVD U S V^T. Modules are read one at a time
from the memory-mapped safetensors file, and the memory one module freed is handed back to the
system before the next is read (`release_freed_memory`), so an adapter larger than memory still works.

What counts as one update: a Linear, Conv1D (GPT-2's `fan_in_fan_out`: the update is transposed,
the spectrum the same) or convolution (A's kernel dimensions flattened into its input), an
embedding (`lora_embedding_A` / `_B`: the update is (B A)^T), and each expert of a fused MoE
parameter (`target_parameters`: PEFT's `ParamWrapper` stacks the experts' A rows expert-major and
B's columns rank-major). DoRA's update is also scale B A, normalised per column against the base
weight and multiplied by the magnitude vector; without the base weight only the direction's
spectrum is known, so the magnitude vector's norm is reported beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from lora_core.errors import one_line, short_repr
from lora_core.inspect.loading import CONFIG_NAME, FLOAT_DTYPES, LORA_KEY, Adapter, AdapterError
from lora_core.models import layer_index
from lora_core.settings import lora_scale

Kind = Literal["linear", "conv", "embedding", "experts"]
ENERGIES = (0.9, 0.99)
# The largest squared norm an update (or a Gram matrix of its factors) may reach: far above any
# trained adapter's (norms near 1), far enough below float64's 1.8e308 that sums over thousands of
# modules and r x r products stay finite.
MAX_ENERGY = 1e200
# The prefix PEFT's save_pretrained puts before the base model's own module names.
SAVED_PREFIX = "base_model.model."
# Fused expert parameters in the order transformers' expert modules define them, which is the order
# PEFT wraps them in (innermost first) when several are targeted on one module.
_EXPERT_PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Module:
    """One adapted weight as the safetensors header describes it (nothing read yet).

    `module` is PEFT's name for it, the key `rank_pattern` and `alpha_pattern` match (for a target
    parameter: `<module>.<parameter>`); `a_key`/`b_key` the tensors' names in the file; `r`, `alpha`
    and `scale` what PEFT gives it; `experts` the number of experts sharing the tensors (1 unless a
    fused MoE parameter); `shape` the update's (d_out, d_in)."""

    module: str
    kind: Kind
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    experts: int
    shape: tuple[int, int]
    magnitude_key: str | None = None

    @property
    def type(self) -> str:
        """The module's type as the heatmap's columns group it: its last name part."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int:
        """Its layer index (PEFT's rule), -1 for modules outside the layer stack."""
        return layer_index(self.module)

    def row_name(self, expert: int) -> str:
        return f"{self.module}[{expert}]" if self.kind == "experts" else self.module


@dataclass(frozen=True)
class Spectrum:
    """The singular values of `scale * B @ A` (descending), and when asked its singular vectors:
    `left` (d_out, k) and `right` (d_in, k), as float64 tensors."""

    singular: np.ndarray
    left: Any = None
    right: Any = None


@dataclass(frozen=True)
class Inspection:
    """What `inspect_adapter` finds: `modules` has one row per update (an expert of a fused
    parameter is one row) with `name`, `module`, `type`, `layer`, `kind`, `expert`, `d_out`,
    `d_in`, `r`, `alpha`, `scale`, `entropy_rank`, `rank_<p>` for each energy p, `norm`,
    `top_singular` and, for DoRA, `magnitude_norm`; `spectra` the singular values by `name`."""

    modules: pd.DataFrame
    spectra: dict[str, np.ndarray]
    energies: tuple[float, ...]


def energy_column(energy: float) -> str:
    """The column holding the rank that keeps `energy` of the squared spectrum: rank_90, rank_99."""
    return f"rank_{energy * 100:g}".replace(".", "_")


def adapter_modules(adapter: Adapter) -> list[Module]:
    """Every adapted weight of `adapter`, from its header and config. Raises `AdapterError` when the
    weights do not fit the config (a rank PEFT would refuse to load, A and B that do not pair)."""
    pairs: dict[str, dict[str, str]] = {}
    for key in adapter.tensors:
        match = LORA_KEY.match(key)
        if match:
            which = match["which"] or match["emb"]
            kind = "embedding" if match["emb"] else "weight"
            pairs.setdefault(match["module"], {"kind": kind})[which] = key
    found = [_module(adapter, prefix, keys) for prefix, keys in sorted(pairs.items())]
    return sorted(found, key=lambda m: (m.layer, m.module))


def _module(adapter: Adapter, prefix: str, keys: dict[str, str]) -> Module:
    label = adapter.label
    if "A" not in keys or "B" not in keys:
        raise AdapterError(f"{label}: {short_repr(prefix)} has lora_{'A' if 'A' not in keys else 'B'} missing")
    a, b = adapter.tensors[keys["A"]], adapter.tensors[keys["B"]]
    for key, info in ((keys["A"], a), (keys["B"], b)):
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{label}: {short_repr(key)} is {info.dtype}, not floating point")
    name = prefix.removeprefix(SAVED_PREFIX)
    config = adapter.config
    if keys["kind"] == "embedding":
        kind: Kind = "embedding"
        ok = len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] == b.shape[1]
        rows, shape = a.shape[0] if ok else 0, (a.shape[1], b.shape[0]) if ok else (0, 0)
    else:
        kind = "conv" if len(a.shape) > 2 else "linear"
        ok = len(a.shape) >= 2 and len(b.shape) == len(a.shape) and a.shape[0] == b.shape[1]
        ok = ok and all(n == 1 for n in b.shape[2:])
        rows = a.shape[0] if ok else 0
        shape = (b.shape[0], int(np.prod(a.shape[1:]))) if ok else (0, 0)
    if not ok or rows == 0:
        raise AdapterError(
            f"{label}: the shapes of {short_repr(prefix)}'s lora_A {a.shape} and lora_B {b.shape} do not pair"
        )
    parameter = _target_parameter(name, config)
    if parameter is not None:
        kind, name = "experts", parameter
    r = _pattern_value(config, "rank_pattern", name, config.get("r", 8), label)
    experts = rows // r if kind == "experts" else 1
    if rows != r * experts or (kind != "experts" and rows != r):
        raise AdapterError(
            f"{label}: {CONFIG_NAME} gives {name} rank {r}, but its weights have {rows} rows: "
            "the config and the weights do not belong together"
        )
    alpha = float(_pattern_value(config, "alpha_pattern", name, config.get("lora_alpha", 8), label))
    scale = lora_scale(r, alpha, bool(config.get("use_rslora", False)))
    magnitude = next((k for k in adapter.tensors if k.startswith(f"{prefix}.lora_magnitude_vector")), None)
    return Module(name, kind, keys["A"], keys["B"], r, alpha, scale, experts, shape, magnitude)


def _pattern_value(config: dict, field: str, module: str, default: Any, label: str) -> Any:
    """PEFT's own lookup (`get_pattern_key`): the first key of `config[field]` matching `module`."""
    from peft.utils.other import get_pattern_key

    pattern = config.get(field) or {}
    try:
        return pattern.get(get_pattern_key(list(pattern), module), default)
    except re.error as error:
        raise AdapterError(f"{label}: {CONFIG_NAME}: `{field}` holds an invalid pattern ({one_line(error)})") from None


def _target_parameter(name: str, config: dict) -> str | None:
    """`<module>.<parameter>` when file module `name` is a `ParamWrapper` of `target_parameters`,
    else None. Several parameters on one module nest: `experts.base_layer` wraps the first."""
    targets = config.get("target_parameters") or []
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name.removesuffix(".base_layer"), depth + 1
    candidates = [t for t in targets if "." in t and _ends_with(name, t.rpartition(".")[0])]
    if not candidates:
        return None
    known = {p: i for i, p in enumerate(_EXPERT_PARAMETER_ORDER)}
    candidates.sort(key=lambda t: known.get(t.rpartition(".")[2], len(known)))
    if depth >= len(candidates):
        return None
    return f"{name}.{candidates[len(candidates) - 1 - depth].rpartition('.')[2]}"


def _ends_with(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


@contextlib.contextmanager
def open_weights(adapter: Adapter) -> Iterator[Any]:
    """The adapter's safetensors file, memory-mapped (tensors are read on `get_tensor`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(adapter.weights), framework="pt") as reader:
            yield reader
    except AdapterError:
        raise
    except Exception as error:  # safetensors' own SafetensorError for a file that passed our header check
        if type(error).__name__ != "SafetensorError":
            raise
        raise AdapterError(f"{adapter.label}: the weights cannot be read ({one_line(error)})") from None


def factors(module: Module, reader: Any, label: str = "adapter") -> list[tuple[Any, Any]]:
    """`[(B, A)]` of `module`, float64: B (d_out, r), A (r, d_in); one pair per expert."""
    release_freed_memory()  # what the modules before this one left behind, before its copies are made
    a = reader.get_tensor(module.a_key).double()
    b = reader.get_tensor(module.b_key).double()
    _check_magnitudes(module, a, b, label)
    if module.kind == "experts":
        a_e = a.reshape(module.experts, module.r, -1)  # (experts, r, d_in)
        b_e = b.reshape(b.shape[0], module.r, module.experts)  # (d_out, r, experts)
        return [(b_e[:, :, e], a_e[e]) for e in range(module.experts)]
    return [(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))]


def release_freed_memory() -> None:
    """Return the heap memory freed so far to the operating system (glibc's `malloc_trim`); where
    the C library has no such call (macOS, musl, Windows), nothing happens.

    Once a large block has been freed, glibc serves blocks of that size from its heap instead of
    fresh mappings, and a small block that outlives them (a spectrum, a truncated factor) keeps the
    heap from giving their pages back: without this, the resident memory of a run over many modules
    can grow with every module read, on some runs by much of the file's size."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # no such symbol, or no C library to load by None
        return None


def _check_magnitudes(module: Module, a: Any, b: Any, label: str) -> None:
    """Refuse NaN or infinite weights, and weights whose Gram matrices or squared update norm
    would overflow float64 (|scale| ||B||_F ||A||_F bounds every singular value; the energy sums
    square it), in one line each, before any eigen- or QR solver sees them."""
    peak_a = float(a.abs().max()) if a.numel() else 0.0  # NaN when any weight is NaN
    peak_b = float(b.abs().max()) if b.numel() else 0.0
    if not (math.isfinite(peak_a) and math.isfinite(peak_b)):
        raise AdapterError(f"{label}: {module.module} holds NaN or infinite weights")
    norm_a, norm_b = math.sqrt(a.numel()) * peak_a, math.sqrt(b.numel()) * peak_b  # bounds of the Frobenius norms
    bound = abs(module.scale) * norm_a * norm_b
    largest = max(norm_a * norm_a, norm_b * norm_b, bound * bound)  # float products reach inf, never raise
    if not largest < MAX_ENERGY:
        raise AdapterError(
            f"{label}: {module.module}: weights too large to analyse: scale {module.scale:.3g}, largest weight "
            f"{max(peak_a, peak_b):.3g}; its energy would overflow float64"
        )


def spectrum(b: Any, a: Any, scale: float, vectors: bool = False) -> Spectrum:
    """The spectrum of `scale * b @ a` from r x r factors of b and a^T (see the module docstring).

    With `vectors`, the factors are thin QR's R (and Q gives the singular vectors). Without, any X
    with X^T X = B^T B serves as well (B = Q X for some orthonormal Q), and the eigendecomposition
    of the Gram matrix B^T B = V W V^T gives one, X = W^(1/2) V^T, for a tenth of QR's time on a
    d x r factor: one matrix product. In float64 the Gram route loses only singular values below
    ~1e-8 of the largest, far under what any rank measure here counts."""
    import torch

    if vectors:
        q_b, r_b = torch.linalg.qr(b)  # (d_out, k), (k, r)
        q_a, r_a = torch.linalg.qr(a.T)  # (d_in, k), (k, r)
        u, s, vh = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)  # the update in the two bases
        return Spectrum(s.numpy(), q_b @ u, q_a @ vh.T)
    core = scale * (_gram_root(b.T @ b) @ _gram_root(a @ a.T).T)  # (r, r)
    return Spectrum(torch.linalg.svdvals(core).numpy())


def _gram_root(gram: Any) -> Any:
    """X with X^T X = `gram` (symmetric positive semidefinite, r x r): W^(1/2) V^T."""
    import torch

    w, v = torch.linalg.eigh(gram)
    return w.clamp(min=0).sqrt()[:, None] * v.T


def rank_measures(singular: np.ndarray, energies: Sequence[float] = ENERGIES) -> dict[str, float]:
    """`entropy_rank`: exp of the entropy of the normalised singular values (Roy & Vetterli 2007);
    `rank_<p>`: the fewest components holding fraction p of the squared spectrum (the Frobenius
    energy, Eckart-Young); `norm`: the update's Frobenius norm; `top_singular`."""
    squared = singular.astype(np.float64) ** 2
    total = squared.sum()
    if total <= 0:
        return {"entropy_rank": 0.0, **{energy_column(p): 0 for p in energies}, "norm": 0.0, "top_singular": 0.0}
    cumulative = np.cumsum(squared) / total
    p = singular / singular.sum()
    p = p[p > 0]
    ranks = {energy_column(e): int(min(np.searchsorted(cumulative, e - 1e-12) + 1, len(singular))) for e in energies}
    return {
        "entropy_rank": float(np.exp(-(p * np.log(p)).sum())),
        **ranks,
        "norm": float(np.sqrt(total)),
        "top_singular": float(singular[0]),
    }


def inspect_adapter(adapter: Adapter, energies: Sequence[float] = ENERGIES) -> Inspection:
    """Spectra and rank measures of every update of `adapter`, read module by module."""
    rows, spectra = [], {}
    with open_weights(adapter) as reader:
        for module in adapter_modules(adapter):
            magnitude = None
            if module.magnitude_key is not None:
                magnitude = float(reader.get_tensor(module.magnitude_key).double().norm())
            for expert, (b, a) in enumerate(factors(module, reader, adapter.label)):
                singular = spectrum(b, a, module.scale).singular
                name = module.row_name(expert)
                spectra[name] = singular
                rows.append(
                    {
                        "name": name,
                        "module": module.module,
                        "type": module.type,
                        "layer": module.layer,
                        "kind": module.kind,
                        "expert": expert if module.kind == "experts" else None,
                        "d_out": module.shape[0],
                        "d_in": module.shape[1],
                        "r": module.r,
                        "alpha": module.alpha,
                        "scale": module.scale,
                        **rank_measures(singular, energies),
                        **({"magnitude_norm": magnitude} if magnitude is not None else {}),
                    }
                )
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["expert"] = frame["expert"].astype("Int64")  # an index for an expert, <NA> for the rest
    return Inspection(frame, spectra, tuple(energies))
