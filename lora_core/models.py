"""Model resolution and module inventory, built on the meta device (no weight memory).

A model is named by a bundled catalogue id, a local directory holding `config.json`, a path to a
`config.json` file, or a Hub id. Whatever the source, it becomes a `ModelSpec` (the config as JSON
plus where it came from); `inventory(spec)` builds the model class on the meta device once per
config and lists every module LoRA can reach.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lora_core.roles import classify_role

CATALOGUE_DIR = Path(__file__).parent / "catalogue"
MAX_CONFIG_BYTES = 1_000_000
HUB_HOST = ("huggingface.co", 443)

# Module kinds the inventory records; PEFT's LoRA wraps all of them except "other".
KINDS = ("linear", "conv1d", "embedding", "conv", "mha", "param", "other")


class ModelResolutionError(ValueError):
    """A model name, path or config that cannot be turned into a model; the message says what to fix."""


@dataclass(frozen=True)
class ModelSpec:
    """A model config and where it came from; `key` identifies the config for caching."""

    model_id: str
    source: str  # "catalogue" | "local" | "hub" | "upload"
    config_json: str
    trust_remote_code: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def key(self) -> str:
        return hashlib.sha1(f"{self.trust_remote_code}:{self.config_json}".encode()).hexdigest()

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


@dataclass(frozen=True)
class Inventory:
    """Every module of a model built on the meta device.

    `modules` has one row per named module: `name`, `kind` (see KINDS), `class_name`, `layer`
    (PEFT's layer index or -1), `role`, `in_features`, `out_features`, `experts` (fused expert
    count, 1 otherwise), `kernel` (product of conv kernel sizes), `groups`, `bias_numel`,
    `numel` (all parameters below the module, tied ones once). `params` has one row per
    parameter: `name`, `module`, `param`, `shape`, `numel`.
    """

    spec: ModelSpec
    model_class: str
    model_type: str
    total_params: int
    output_embedding: str | None
    modules: pd.DataFrame
    params: pd.DataFrame
    facts: dict[str, Any]

    def names(self, kinds: tuple[str, ...] = ("linear", "conv1d", "embedding", "conv", "mha")) -> list[str]:
        """Full names of the modules of the given kinds."""
        return self.modules.loc[self.modules["kind"].isin(kinds), "name"].tolist()


def catalogue_ids() -> list[str]:
    """Hub ids of the bundled configs, sorted."""
    return sorted(path.stem.replace("__", "/") for path in CATALOGUE_DIR.glob("*.json"))


def catalogue_path(model_id: str) -> Path:
    return CATALOGUE_DIR / f"{model_id.replace('/', '__')}.json"


def resolve_model(name: str | ModelSpec, trust_remote_code: bool = False) -> ModelSpec:
    """A `ModelSpec` for a catalogue id, a directory with config.json, a config.json path or a Hub id.

    Raises `ModelResolutionError` with a one-line reason when nothing usable is found; an unknown
    Hub id while offline fails within seconds (Hub reachability is probed first).
    """
    if isinstance(name, ModelSpec):
        return name
    name = str(name).strip()
    if not name:
        raise ModelResolutionError("no model given: pick a catalogue model, a Hub id, or a path to config.json")
    if catalogue_path(name).is_file():
        return spec_from_text(catalogue_path(name).read_text(), name, "catalogue")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"directory {name} has no config.json: point at a model folder or its config.json"
            )
        return spec_from_text((path / "config.json").read_text(), name, "local", trust_remote_code)
    if path.is_file():
        return spec_from_text(path.read_text(), name, "local", trust_remote_code)
    if path.suffix == ".json" or name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise ModelResolutionError(f"no such file or folder: {name}")
    return _resolve_hub(name, trust_remote_code)


def spec_from_text(
    text: str | bytes, model_id: str, source: str = "upload", trust_remote_code: bool = False
) -> ModelSpec:
    """A `ModelSpec` from config.json text. Raises `ModelResolutionError` for oversize, non-JSON or
    configs without a `model_type` transformers knows."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelResolutionError(
            f"{model_id}: config is {len(text):,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}"
        )
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = getattr(error, "msg", str(error))
        raise ModelResolutionError(f"{model_id}: not valid JSON ({reason}); upload the model's config.json") from None
    if not isinstance(data, dict):
        raise ModelResolutionError(f"{model_id}: config.json must be a JSON object")
    _check_model_type(data, model_id, trust_remote_code)
    return ModelSpec(model_id, source, json.dumps(data, sort_keys=True), trust_remote_code)


def _check_model_type(data: dict[str, Any], model_id: str, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise ModelResolutionError(f"{model_id}: config.json has no `model_type`; is this a transformers config?")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and data.get("auto_map")):
        raise ModelResolutionError(
            f"{model_id}: model_type {model_type!r} is unknown to this transformers; "
            "upgrade transformers or, for custom code you trust, allow trust_remote_code"
        )


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hub answers a TCP connect; False when offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_hub(model_id: str, trust_remote_code: bool) -> ModelSpec:
    from transformers import AutoConfig

    hint = f"pick one of the {len(catalogue_ids())} catalogue models, upload its config.json, or give a local path"
    try:
        config = AutoConfig.from_pretrained(model_id, local_files_only=True, trust_remote_code=trust_remote_code)
        return ModelSpec(model_id, "hub", json.dumps(config.to_dict(), sort_keys=True, default=str), trust_remote_code)
    except Exception:
        pass
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        raise ModelResolutionError(
            f"{model_id!r} is not in the catalogue or the local HF cache and the Hub is unreachable: {hint}"
        )
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelResolutionError(f"{model_id!r} could not be loaded from the Hub ({first_line}); {hint}") from None
    return ModelSpec(model_id, "hub", json.dumps(config.to_dict(), sort_keys=True, default=str), trust_remote_code)


# Models handed in directly (`inventory_of`), by spec key: tests and non-transformers modules.
_GIVEN_MODELS: dict[str, Any] = {}


@functools.lru_cache(maxsize=8)
def meta_model(spec: ModelSpec):
    """`build_meta_model(spec)`, cached per config: shared, so never hand it to PEFT (it mutates)."""
    if spec.key in _GIVEN_MODELS:
        return _GIVEN_MODELS[spec.key]
    return build_meta_model(spec)


def build_meta_model(spec: ModelSpec):
    """A fresh instance of `spec`'s model class on the meta device (no weights, no init).

    The class is `config.architectures[0]` when transformers has it, else the causal-LM class of
    the model type, else `AutoModel`. Raises `ModelResolutionError` when none can be built.
    """
    from transformers import AutoConfig

    data = spec.config
    try:
        if spec.trust_remote_code:
            config = AutoConfig.from_pretrained(spec.model_id, trust_remote_code=True)
        else:
            fields = {k: v for k, v in data.items() if k != "model_type"}
            with _quiet_transformers():
                config = AutoConfig.for_model(data["model_type"], **fields)
    except Exception as error:
        raise ModelResolutionError(
            f"{spec.model_id}: transformers rejects this config ({_first_line(error)})"
        ) from None
    with _quiet_transformers():
        return _instantiate(spec, config, data)


def _instantiate(spec: ModelSpec, config, data: dict[str, Any]):
    import torch
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    candidates = []
    architecture = (data.get("architectures") or [None])[0]
    if architecture and hasattr(transformers, architecture):
        candidates.append(getattr(transformers, architecture))
    candidates += [AutoModelForCausalLM, AutoModel]
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                if cls in (AutoModelForCausalLM, AutoModel):
                    return cls.from_config(config, trust_remote_code=spec.trust_remote_code)
                return cls._from_config(config)
        except Exception as error:
            errors.append(f"{getattr(cls, '__name__', cls)}: {_first_line(error)}")
    raise ModelResolutionError(f"{spec.model_id}: no model class could be built ({'; '.join(errors)})")


@contextlib.contextmanager
def _quiet_transformers():
    # Config fix-up notices (e.g. Gemma's legacy `gelu`) are noise when only counting.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.lru_cache(maxsize=16)
def inventory(spec: ModelSpec) -> Inventory:
    """The module inventory of `spec`, cached per config. See `Inventory` for the columns."""
    return _take_inventory(spec, meta_model(spec))


def as_inventory(model: str | ModelSpec | Inventory) -> Inventory:
    """The inventory of a catalogue id, path, Hub id, `ModelSpec`, or an `Inventory` as is."""
    return model if isinstance(model, Inventory) else inventory(resolve_model(model))


def inventory_of(spec: ModelSpec, model) -> Inventory:
    """The inventory of an `nn.Module` you already have (any module, not only transformers');
    `spec` names it for caching and messages."""
    _GIVEN_MODELS[spec.key] = model
    meta_model.cache_clear()
    inventory.cache_clear()
    return inventory(spec)


def _take_inventory(spec: ModelSpec, model) -> Inventory:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_name = next((n for n, m in model.named_modules() if m is output), None) if output is not None else None
    module_rows = [_module_row(name, module, output_name) for name, module in model.named_modules() if name]
    seen: set[int] = set()
    param_rows = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            param_rows.append((full, module_name, param_name, tuple(param.shape), int(param.numel())))
    modules = pd.DataFrame(module_rows, columns=_MODULE_COLUMNS)
    params = pd.DataFrame(param_rows, columns=["name", "module", "param", "shape", "numel"])
    fused = params[params["shape"].map(len) == 3]
    modules = pd.concat([modules, _param_module_rows(fused)], ignore_index=True)
    return Inventory(
        spec=spec,
        model_class=type(model).__name__,
        model_type=spec.model_type,
        total_params=int(params["numel"].sum()),
        output_embedding=output_name,
        modules=modules,
        params=params,
        facts=_facts(getattr(model, "config", None), modules, int(params["numel"].sum())),
    )


_MODULE_COLUMNS = [
    "name",
    "kind",
    "class_name",
    "layer",
    "role",
    "in_features",
    "out_features",
    "experts",
    "kernel",
    "groups",
    "bias_numel",
    "numel",
]


def _module_row(name: str, module, output_name: str | None) -> tuple:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    kind, fan_in, fan_out, kernel, groups = "other", 0, 0, 1, 1
    if isinstance(module, nn.Linear):
        kind, fan_in, fan_out = "linear", module.in_features, module.out_features
    elif isinstance(module, Conv1D):
        # Conv1D stores weight as (in, out): the transpose of nn.Linear.
        kind, (fan_in, fan_out) = "conv1d", module.weight.shape
    elif isinstance(module, nn.Embedding):
        kind, fan_in, fan_out = "embedding", module.num_embeddings, module.embedding_dim
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kind, fan_in, fan_out, groups = "conv", module.in_channels, module.out_channels, module.groups
        kernel = int(np.prod(module.kernel_size))
    elif isinstance(module, nn.MultiheadAttention):
        kind, fan_in, fan_out = "mha", module.embed_dim, module.embed_dim
    bias = getattr(module, "bias", None) if kind != "embedding" else None
    bias_numel = int(bias.numel()) if isinstance(bias, nn.Parameter) else 0
    numel = sum(int(p.numel()) for p in module.parameters())
    role = classify_role(name, kind, name == output_name)
    return (
        name,
        kind,
        type(module).__name__,
        layer_index(name),
        role,
        fan_in,
        fan_out,
        1,
        kernel,
        groups,
        bias_numel,
        numel,
    )


def _param_module_rows(fused: pd.DataFrame) -> pd.DataFrame:
    """Rows for fused 3-D expert parameters (transformers 5 MoE), reachable with `target_parameters`."""
    rows = []
    for name, shape, numel in zip(fused["name"], fused["shape"], fused["numel"]):
        experts, dim_a, dim_b = shape
        rows.append(
            (
                name,
                "param",
                "Parameter",
                layer_index(name),
                classify_role(name, "param", False),
                dim_b,
                dim_a,
                experts,
                1,
                1,
                0,
                numel,
            )
        )
    return pd.DataFrame(rows, columns=_MODULE_COLUMNS)


def layer_index(name: str) -> int:
    """PEFT's layer index for a module name: the first `.<digits>.` segment after a named part, or -1."""
    import re

    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(match.group("idx")) if match else -1


def _facts(config, modules: pd.DataFrame, total: int) -> dict[str, Any]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "")
    layers = modules.loc[modules["layer"] >= 0, "layer"]

    def first(*names):
        return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

    return {
        "model_type": model_type,
        "layers": first("num_hidden_layers", "n_layer", "num_layers") or (int(layers.max()) + 1 if len(layers) else 0),
        "hidden_size": first("hidden_size", "n_embd", "d_model", "dim"),
        "intermediate_size": first("intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim"),
        "attention_heads": first("num_attention_heads", "n_head", "num_heads", "n_heads"),
        "kv_heads": first("num_key_value_heads"),
        "vocab_size": first("vocab_size"),
        "experts": first("num_local_experts", "num_experts", "n_routed_experts"),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "total_params": total,
    }
