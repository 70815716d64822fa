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
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lora_core.errors import InputError, one_line, short_repr
from lora_core.roles import classify_role
from lora_core.settings import MAX_LAYER

CATALOGUE_DIR = Path(__file__).parent / "catalogue"
MAX_CONFIG_BYTES = 1_000_000
# Where the app may read configs from the server's disk (see `local_model_roots`).
MODEL_ROOTS_ENV = "LORA_EXPLORER_MODEL_ROOTS"

# Upper bounds on a config's sizes, each several times the largest published model (2025: 126
# layers in Llama-3.1-405B, hidden 16384, FFN 53248, vocab 262144, 384 experts in Kimi K2). A
# config beyond them is a typo or an attack: building it on the meta device would take minutes
# and gigabytes (1,000,000 layers), and its counts would overflow 64-bit integers (hidden 1e9).
MAX_POSITIONS = 1 << 24
SIZE_LIMITS: tuple[tuple[str, re.Pattern[str], int], ...] = (
    ("layers", re.compile(r"(^|_)(n_)?layers?$|^n_layer$|^num_.*layers$"), MAX_LAYER),
    ("width", re.compile(r"^(hidden_size|n_embd|d_model|dim|head_dim|d_kv|kv_lora_rank|q_lora_rank)$"), 65536),
    (
        "FFN width",
        re.compile(r"intermediate_size$|^(d_ff|n_inner|ffn_dim|hidden_dim|encoder_ffn_dim|decoder_ffn_dim)$"),
        1 << 20,
    ),
    ("vocabulary", re.compile(r"^vocab_size$"), 1 << 22),
    ("experts", re.compile(r"experts$|^num_experts_per_tok$|^moe_topk$"), 4096),
    ("heads", re.compile(r"heads$|^n_head$"), 4096),
    ("positions", re.compile(r"^(max_position_embeddings|n_positions|n_ctx)$"), MAX_POSITIONS),
)
# Layers x experts, since some MoE classes build one module per expert (Kimi K2: 61 x 384 = 23,424).
MAX_EXPERT_LAYERS = 1 << 17
MAX_TOTAL_PARAMS = 10**13  # 5x the largest published model; keeps every count far inside int64
HUB_HOST = ("huggingface.co", 443)

# Module kinds the inventory records; PEFT's LoRA wraps all of them except "other".
KINDS = ("linear", "conv1d", "embedding", "conv", "mha", "param", "other")


class ModelResolutionError(InputError):
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


def local_model_roots() -> tuple[Path, ...] | None:
    """Where the app may read model configs from the server's disk, from $LORA_EXPLORER_MODEL_ROOTS:
    unset means anywhere (the local user's own app), empty or `none` means nowhere (local paths
    off), else folders separated by `os.pathsep`. A server shared with others sets it, so nobody
    can probe the server's files through the model field (the Docker image sets `/models`)."""
    value = os.environ.get(MODEL_ROOTS_ENV)
    if value is None:
        return None
    if value.strip().lower() in ("", "none", "off"):
        return ()
    return tuple(Path(part).expanduser().resolve() for part in value.split(os.pathsep) if part.strip())


def resolve_model(
    name: str | ModelSpec, trust_remote_code: bool = False, local_roots: tuple[Path, ...] | None = None
) -> ModelSpec:
    """A `ModelSpec` for a catalogue id, a directory with config.json, a config.json path or a Hub id.

    `local_roots` limits which local paths may be read: None allows any (the CLI, the local app),
    `()` none, else only paths inside those folders. Outside them every path gets the same answer,
    whether it exists or not, so the field cannot be used to probe the disk.

    Raises `ModelResolutionError` with a one-line reason when nothing usable is found; an unknown
    Hub id while offline fails within seconds (Hub reachability is probed first).
    """
    if isinstance(name, ModelSpec):
        return name
    name = str(name).strip()
    if not name:
        raise ModelResolutionError("no model given: pick a catalogue model, a Hub id, or a path to config.json")
    if "\x00" in name or len(name) > 4096:
        raise ModelResolutionError(
            "a model name is a catalogue id, a Hub id or a path: this one has invalid characters"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a path: every table and message downstream needs text
        raise ModelResolutionError(
            f"{short_repr(name)}: the name holds bytes that are not UTF-8 text; rename the folder"
        ) from None
    try:
        local = _resolve_local(name, trust_remote_code, local_roots)
    except (OSError, RuntimeError, ValueError) as error:  # a name too long for a path, ~nosuchuser/...
        if isinstance(error, ModelResolutionError):
            raise
        if local_roots is not None:  # the same answer as any other path outside the roots
            raise ModelResolutionError(_outside_message(short_repr(name), local_roots)) from None
        raise ModelResolutionError(f"{short_repr(name)}: not a usable path ({one_line(error)})") from None
    if local is not None:
        return local
    return _resolve_hub(name, trust_remote_code)


def _resolve_local(name: str, trust_remote_code: bool, local_roots: tuple[Path, ...] | None) -> ModelSpec | None:
    """The spec of a catalogue id or a local path; None for a name to look up on the Hub."""
    if catalogue_path(name).is_file():
        return spec_from_text(catalogue_path(name).read_text(), name, "catalogue")
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1
    path = Path(name).expanduser()
    # Outside the roots a path is refused unread; an org/name that is not on the disk goes to the Hub.
    if local_roots is not None and (looks_local or path.exists()) and not _inside(path, local_roots):
        raise ModelResolutionError(_outside_message(name, local_roots))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"directory {name} has no config.json: point at a model folder or its config.json"
            )
        return spec_from_text(_read_config(path / "config.json", name), name, "local", trust_remote_code)
    if path.is_file():
        return spec_from_text(_read_config(path, name), name, "local", trust_remote_code)
    if looks_local:
        raise ModelResolutionError(f"no such file or folder: {name}")
    return None


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, links resolved, lies inside one of `roots`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return any(resolved == root or root in resolved.parents for root in roots)


def _outside_message(name: str, roots: tuple[Path, ...]) -> str:
    """The one answer for every path outside the roots, whether it exists or not."""
    if roots:
        return f"{name}: local paths are limited to {', '.join(str(root) for root in roots)} on this server"
    return f"{name}: local model paths are off on this server: pick a catalogue model, a Hub id or upload a config.json"


def _read_config(path: Path, name: str) -> bytes:
    """The bytes of a config file, refusing oversize files before reading them whole."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ModelResolutionError(f"{name}: cannot be read ({error.strerror or error})") from None
    return data


def spec_from_text(
    text: str | bytes, model_id: str, source: str = "upload", trust_remote_code: bool = False
) -> ModelSpec:
    """A `ModelSpec` from config.json text. Raises `ModelResolutionError` for oversize, non-JSON or
    binary data, absurd sizes, and configs without a `model_type` transformers knows."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelResolutionError(
            f"{model_id}: the file is over {MAX_CONFIG_BYTES:,} bytes; a config.json is at most that: use the model's config.json"
        )
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else reason
        raise ModelResolutionError(f"{model_id}: not valid JSON ({reason}); upload the model's config.json") from None
    if not isinstance(data, dict):
        raise ModelResolutionError(f"{model_id}: config.json must be a JSON object")
    _check_model_type(data, model_id, trust_remote_code)
    check_sizes(data, model_id)
    return ModelSpec(model_id, source, json.dumps(data, sort_keys=True), trust_remote_code)


def check_sizes(config: dict[str, Any], model_id: str) -> None:
    """Refuse a config whose sizes are negative, fractional or beyond `SIZE_LIMITS` (nested
    sub-configs included) before anything is built from it."""
    for key, value in _sized_items(config):
        for label, pattern, limit in SIZE_LIMITS:
            if not pattern.search(key):
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or value < 0:
                raise ModelResolutionError(f"{model_id}: `{key}` must be a whole number >= 0, got {value!r}")
            if value > limit:
                raise ModelResolutionError(
                    f"{model_id}: `{key}` = {value:,} is beyond any real model ({label} limit {limit:,}): fix the config"
                )
            break
    layers = max((v for k, v in _sized_items(config) if SIZE_LIMITS[0][1].search(k)), default=0)
    experts = max((v for k, v in _sized_items(config) if k.endswith("experts")), default=0)
    if layers * max(experts, 1) > MAX_EXPERT_LAYERS:
        raise ModelResolutionError(
            f"{model_id}: {layers:,} layers x {experts:,} experts is beyond any real model "
            f"(limit {MAX_EXPERT_LAYERS:,} expert layers): fix the config"
        )


def _sized_items(config: dict[str, Any], depth: int = 0):
    """(key, value) pairs of numbers in `config` and its nested sub-configs (text_config, ...)."""
    for key, value in config.items():
        if isinstance(value, dict) and depth < 4:
            yield from _sized_items(value, depth + 1)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(key, str):
            yield key, value


def _check_model_type(data: dict[str, Any], model_id: str, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelResolutionError(f"{model_id}: `model_type` must be a string, got {short_repr(model_type)}")
    architectures = data.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
    ):
        raise ModelResolutionError(
            f"{model_id}: `architectures` must be a list of class names, got {short_repr(architectures)}"
        )
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
    except Exception:
        pass
    else:
        return _hub_spec(model_id, config, trust_remote_code)
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        raise ModelResolutionError(
            f"{model_id!r} is not in the catalogue or the local HF cache and the Hub is unreachable: {hint}"
        )
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelResolutionError(
            f"{model_id!r} could not be loaded from the Hub ({one_line(error)}); {hint}"
        ) from None
    return _hub_spec(model_id, config, trust_remote_code)


def _hub_spec(model_id: str, config, trust_remote_code: bool) -> ModelSpec:
    data = config.to_dict()
    check_sizes(data, model_id)
    return ModelSpec(model_id, "hub", json.dumps(data, sort_keys=True, default=str), trust_remote_code)


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
    check_sizes(data, spec.model_id)
    try:
        if spec.trust_remote_code:
            config = AutoConfig.from_pretrained(spec.model_id, trust_remote_code=True)
        else:
            fields = {k: v for k, v in data.items() if k != "model_type"}
            with _quiet_transformers():
                config = AutoConfig.for_model(data["model_type"], **fields)
    except Exception as error:
        raise ModelResolutionError(f"{spec.model_id}: transformers rejects this config ({one_line(error)})") from None
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
            errors.append(f"{getattr(cls, '__name__', cls)}: {one_line(error)}")
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


@functools.lru_cache(maxsize=16)
def inventory(spec: ModelSpec) -> Inventory:
    """The module inventory of `spec`, cached per config. See `Inventory` for the columns.
    Raises `ModelResolutionError` for a model beyond `MAX_TOTAL_PARAMS`."""
    inv = _take_inventory(spec, meta_model(spec))
    if inv.total_params > MAX_TOTAL_PARAMS:
        raise ModelResolutionError(
            f"{spec.model_id}: {inv.total_params:,} parameters is beyond any real model "
            f"(limit {MAX_TOTAL_PARAMS:,}): fix the config's sizes"
        )
    return inv


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
    total = sum(row[-1] for row in param_rows)  # Python ints: an absurd config must not wrap around
    modules = pd.DataFrame(module_rows, columns=_MODULE_COLUMNS)
    params = pd.DataFrame(param_rows, columns=["name", "module", "param", "shape", "numel"])
    fused = params[params["shape"].map(len) == 3]
    modules = pd.concat([modules, _param_module_rows(fused)], ignore_index=True)
    return Inventory(
        spec=spec,
        model_class=type(model).__name__,
        model_type=spec.model_type,
        total_params=total,
        output_embedding=output_name,
        modules=modules,
        params=params,
        facts=_facts(getattr(model, "config", None), modules, total),
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
