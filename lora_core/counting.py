"""Exact LoRA parameter counts, as `get_peft_model(...).get_nb_trainable_parameters()` gives them.

Matching is delegated to PEFT's own functions (`check_target_module_exists`, the `"all-linear"`
expansion and the transformers-5 MoE config conversion) run against the meta-device model, so a
module is adapted here exactly when PEFT would adapt it. Only the arithmetic is ours:

- Linear / Conv1D: `r * (in + out)` (`lora_A` is r x in, `lora_B` is out x r), + `out` for the
  DoRA magnitude, + `out` for `lora_bias`;
- Embedding: `r * (num_embeddings + embedding_dim)`, + `embedding_dim` for DoRA;
- ConvNd: `r * in * prod(kernel)` + `out * r / groups`, + `out` for DoRA or `lora_bias`;
- ParamWrapper (`target_parameters`): `r * experts * (in + out)`.

The plan (which modules, which pattern keys) is cached per targeting fields, so a change of only
`r` or `lora_alpha` is a few vectorised sums.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lora_core.errors import short_repr
from lora_core.models import Inventory, ModelSpec, as_inventory, inventory, meta_model
from lora_core.settings import ALL_LINEAR, LoraSettings, LoraSettingsError, lora_scale, param_wrapper_problems

SUPPORTED_KINDS = ("linear", "conv1d", "embedding", "conv")
# PEFT's PeftModelFor* classes add their heads to `modules_to_save`.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# Fields that decide which modules are adapted (and so key the cached plan).
_PLAN_FIELDS = (
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "task_type",
)
MODULE_COLUMNS = [
    "name",
    "layer",
    "role",
    "kind",
    "in_features",
    "out_features",
    "experts",
    "rank",
    "alpha",
    "scale",
    "params",
]


@dataclass(frozen=True)
class CountResult:
    """Counts for one model and one settings object.

    `trainable_params` and `all_params` equal PEFT's `get_nb_trainable_parameters()`;
    `base_params` is the model before PEFT (tied weights once); `lora_params` the adapter
    matrices (and DoRA magnitudes, LoRA biases); `modules` one row per adapted module.
    """

    model_id: str
    settings: LoraSettings
    trainable_params: int
    all_params: int
    base_params: int
    lora_params: int
    bias_params: int
    saved_module_params: int
    modules: pd.DataFrame
    warnings: tuple[str, ...] = field(default=())

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: counts, percent, warnings and the per-module rows."""
        return {
            "model": self.model_id,
            "trainable_params": self.trainable_params,
            "all_params": self.all_params,
            "base_params": self.base_params,
            "lora_params": self.lora_params,
            "percent_trainable": round(self.percent_trainable, 6),
            "warnings": list(self.warnings),
            "settings": self.settings.to_peft_dict(),
            "modules": [
                {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
                for row in self.modules.to_dict(orient="records")
            ],
        }


@dataclass(frozen=True)
class _Plan:
    arrays: dict[str, np.ndarray]  # inventory columns of the adapted modules and parameters
    rank_keys: tuple[str | None, ...]  # per target: the winning rank_pattern key, or None
    alpha_keys: tuple[str | None, ...]
    fused_multiplier: np.ndarray  # (n_targets,) rank/alpha factor PEFT's MoE conversion applies
    saved_module_params: int
    problems: tuple[str, ...]
    warnings: tuple[str, ...]


def count_lora_params(model: str | ModelSpec | Inventory, settings: LoraSettings) -> CountResult:
    """Count the parameters `get_peft_model(model, settings.to_peft_config())` would have.

    `model` is a catalogue id, a path, a Hub id, a `ModelSpec` or an `Inventory`. Raises
    `LoraSettingsError` listing every problem (fields named) where PEFT would refuse the config or
    where it is certainly a mistake (a target matching nothing, a pattern key matching no target),
    and `ModelResolutionError` for a model that cannot be resolved.
    """
    inv = as_inventory(model)
    problems = settings.problems()
    if problems:
        raise LoraSettingsError(problems)
    plan = _plan(inv, _plan_key(settings, inv))
    problems = list(plan.problems) + _param_wrapper_problems(inv, plan, settings)
    if problems:
        raise LoraSettingsError(problems)
    return _tally(inv, settings, plan)


def _plan_key(settings: LoraSettings, inv: Inventory) -> LoraSettings:
    # r and alpha enter the plan only through PEFT's MoE conversion (which writes 2r patterns);
    # the multiplier is recorded instead, so the key drops them.
    neutral = {
        name: getattr(LoraSettings(), name) for name in ("lora_dropout", "use_rslora", "use_dora", "bias", "lora_bias")
    }
    return settings.replace(r=1, lora_alpha=1, **neutral)


def _tally(inv: Inventory, settings: LoraSettings, plan: _Plan) -> CountResult:
    a = plan.arrays
    rank = np.array([settings.rank_pattern[k] if k else settings.r for k in plan.rank_keys], dtype=np.int64)
    alpha = np.array([settings.alpha_pattern[k] if k else settings.lora_alpha for k in plan.alpha_keys], dtype=float)
    fused = plan.fused_multiplier
    rank = np.where(fused > 1, settings.r * fused, rank)
    alpha = np.where(fused > 1, settings.lora_alpha * fused, alpha)

    kind, fan_in, fan_out = a["kind"], a["in_features"], a["out_features"]
    params = rank * a["experts"] * (fan_in + fan_out)
    conv_params = rank * fan_in * a["kernel"] + fan_out * rank // np.maximum(a["groups"], 1)
    params = np.where(kind == "conv", conv_params, params)
    if settings.use_dora:
        params = params + np.where(kind != "param", fan_out, 0)  # the magnitude vector
    if settings.lora_bias:
        params = params + np.where(kind != "embedding", fan_out, 0)  # lora_B's bias
    scale = lora_scale(rank, alpha, settings.use_rslora)

    lora = int(params.sum())
    bias = _trainable_bias(inv, settings, a)
    saved = plan.saved_module_params
    columns = {name: a[name] for name in ("name", "layer", "role", "kind", "in_features", "out_features", "experts")}
    modules = pd.DataFrame({**columns, "rank": rank, "alpha": alpha, "scale": scale, "params": params})
    return CountResult(
        model_id=inv.spec.model_id,
        settings=settings,
        trainable_params=lora + bias + saved,
        all_params=inv.total_params + lora + saved,
        base_params=inv.total_params,
        lora_params=lora,
        bias_params=bias,
        saved_module_params=saved,
        modules=modules,
        warnings=plan.warnings + tuple(_rank_warnings(modules)),
    )


def _trainable_bias(inv: Inventory, settings: LoraSettings, arrays: dict[str, np.ndarray]) -> int:
    if settings.bias == "lora_only":
        # PEFT: every LoRA layer whose base layer has a bias trains that bias.
        return int(arrays["bias_numel"][arrays["kind"] != "param"].sum())
    if settings.bias == "all":
        # PEFT: every parameter named `bias` or `*.bias` trains, LayerNorm biases included.
        return _all_bias_numel(inv.spec, inv)
    return 0


def _all_bias_numel(spec: ModelSpec, inv: Inventory) -> int:
    names = inv.params["name"]
    return int(inv.params.loc[(names == "bias") | names.str.endswith(".bias"), "numel"].sum())


def _rank_warnings(modules: pd.DataFrame) -> list[str]:
    smaller = np.minimum(modules["in_features"], modules["out_features"])
    too_big = modules[modules["rank"] > smaller]
    if too_big.empty:
        return []
    example = too_big.iloc[0]
    return [
        f"`r` {int(example['rank'])} exceeds the smaller side of {len(too_big)} targeted module(s), e.g. "
        f"{example['name']} ({int(example['in_features'])} x {int(example['out_features'])}): the update cannot use that rank"
    ]


def _param_wrapper_problems(inv: Inventory, plan: _Plan, settings: LoraSettings) -> list[str]:
    """What PEFT refuses on the layers the plan adapts. Settings naming `target_parameters` were
    refused by `settings.problems()` already; this catches the parameters PEFT's MoE conversion adds."""
    kinds = set(plan.arrays["kind"])
    found = []
    if "param" in kinds:
        found += param_wrapper_problems(settings, "the fused expert parameters this config adapts")
    if settings.lora_bias and "embedding" in kinds:
        found.append("`lora_bias` is not supported on embedding layers (PEFT refuses it)")
    return found


@functools.lru_cache(maxsize=256)
def _plan_cached(spec: ModelSpec, key: LoraSettings) -> _Plan:
    return _build_plan(inventory(spec), key)


def _plan(inv: Inventory, key: LoraSettings) -> _Plan:
    try:
        return _plan_cached(inv.spec, key)
    except TypeError:  # unhashable pattern values: plan without the cache
        return _build_plan(inv, key)


def normalised_peft_config(inv: Inventory, settings: LoraSettings):
    """The LoraConfig PEFT's matching sees: default targets resolved, the transformers-5 MoE
    conversion applied, `"all-linear"` expanded. Returns (config, problems)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    problems: list[str] = []
    config = settings.to_peft_config()
    heads = _TASK_HEADS.get(str(settings.task_type or "").upper())
    if heads:
        config.modules_to_save = list(config.modules_to_save or []) + list(heads)
    if config.target_modules is None and not config.target_parameters:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(inv.model_type)
        if default is None:
            problems.append(
                f"`target_modules` must be given: PEFT has no default targets for model type {inv.model_type!r}"
            )
            return config, problems
        config.target_modules = set(default)
    model = meta_model(inv.spec)
    # PEFT's transformers-5 conversion only rewrites configs of models with fused MoE expert
    # parameters; skipping it elsewhere also skips building transformers' mapping cache (~0.13 s).
    has_fused_experts = bool((inv.modules["kind"] == "param").any())
    if has_fused_experts and get_checkpoint_conversion_mapping(inv.model_type) is not None:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

        try:
            convert_peft_config_for_transformers(config, model=model, conversions=None)
        except ValueError as error:
            problems.append(f"`target_modules`: {error}")
    config = _maybe_include_all_linear_layers(config, model)
    return config, problems


def _build_plan(inv: Inventory, settings: LoraSettings) -> _Plan:
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config, problems = normalised_peft_config(inv, copy.deepcopy(settings))
    modules = inv.modules
    is_param = (modules["kind"] == "param").to_numpy()
    names = modules["name"].tolist()
    matched, excluded = [], 0
    if not problems:
        for i, name in enumerate(names):
            if is_param[i]:
                continue
            result = check_target_module_exists(config, name)
            if isinstance(result, _ExcludedModule):
                excluded += 1
            elif result:
                matched.append(i)
    unsupported = [names[i] for i in matched if modules.at[i, "kind"] not in SUPPORTED_KINDS]
    if unsupported:
        kinds = sorted({modules.at[i, "class_name"] for i in matched if names[i] in unsupported})
        problems.append(
            f"`target_modules` matches {len(unsupported)} module(s) LoRA cannot wrap ({', '.join(kinds)}), e.g. "
            f"{unsupported[0]}: target Linear, Conv1D, Embedding or Conv layers"
        )
    param_table, param_problems = _match_parameters(inv, config, {names[i] for i in matched})
    problems += param_problems
    table = pd.concat([modules.iloc[matched], param_table], ignore_index=True)
    names = table["name"].tolist()
    warnings: list[str] = []
    if not problems and table.empty:
        problems.append(_no_match_message(inv, settings, excluded))
    if not problems:
        warnings += _unused_entry_warnings(settings, names)
    rank_keys, alpha_keys, fused = _pattern_keys(settings, config, names)
    problems += _unused_pattern_problems(settings, names)
    saved, saved_warnings = _modules_to_save(inv, config)
    numeric = ("layer", "in_features", "out_features", "experts", "kernel", "groups", "bias_numel", "numel")
    arrays = {c: table[c].to_numpy(dtype=np.int64 if c in numeric else object) for c in table.columns}
    return _Plan(arrays, rank_keys, alpha_keys, fused, saved, tuple(problems), tuple(warnings + saved_warnings))


def _match_parameters(inv: Inventory, config, matched: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """PEFT `_inject_parameters`: a parameter is targeted when its full name equals an entry or
    ends with `.entry`. Returns inventory-shaped rows (2-D weights get one, e.g. a MoE router)."""
    from lora_core.models import _MODULE_COLUMNS, layer_index
    from lora_core.roles import classify_role

    targets = sorted(config.target_parameters or [])
    rows: list[tuple] = []
    problems: list[str] = []
    for name, module, shape in zip(inv.params["name"], inv.params["module"], inv.params["shape"]):
        if not targets or not (name in targets or any(name.endswith(f".{t}") for t in targets)):
            continue
        if module in matched:
            problems.append(
                f"`target_parameters` {name} sits in {module}, which `target_modules` also adapts: target one or the other"
            )
        elif len(shape) not in (2, 3):
            problems.append(f"`target_parameters` {name} has shape {shape}: only 2-D and 3-D parameters can be adapted")
        else:
            experts, dim_out, dim_in = shape if len(shape) == 3 else (1, *shape)
            role = classify_role(name, "param", False)
            rows.append(
                (
                    name,
                    "param",
                    "Parameter",
                    layer_index(name),
                    role,
                    dim_in,
                    dim_out,
                    experts,
                    1,
                    1,
                    0,
                    int(np.prod(shape)),
                )
            )
    if targets and not rows and not problems:
        problems.append(f"`target_parameters` {targets} match no parameter of {inv.spec.model_id}")
    return pd.DataFrame(rows, columns=_MODULE_COLUMNS), problems


def _pattern_keys(settings: LoraSettings, config, names: list[str]):
    from peft.utils.other import get_pattern_key

    user_rank, user_alpha = list(settings.rank_pattern), list(settings.alpha_pattern)
    rank_keys, alpha_keys, fused = [], [], np.ones(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        r_key = get_pattern_key(list(config.rank_pattern), name)
        a_key = get_pattern_key(list(config.alpha_pattern), name)
        if r_key in config.rank_pattern and r_key not in user_rank:
            # Added by PEFT's MoE conversion: a fused gate_up_proj gets rank and alpha times the parts.
            fused[i] = config.rank_pattern[r_key] // max(settings.r, 1)
            r_key = None
        if a_key in config.alpha_pattern and a_key not in user_alpha:
            a_key = None
        rank_keys.append(r_key if r_key in settings.rank_pattern else None)
        alpha_keys.append(a_key if a_key in settings.alpha_pattern else None)
    return tuple(rank_keys), tuple(alpha_keys), fused


def _unused_pattern_problems(settings: LoraSettings, names: list[str]) -> list[str]:
    problems = []
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(settings, field_name):
            try:
                pattern = re.compile(rf"(.*\.)?({key})$")
            except re.error as error:
                problems.append(f"`{field_name}` key {key!r} is not a valid regex ({error})")
                continue
            if not any(pattern.match(name) for name in names):
                problems.append(f"`{field_name}` key {key!r} matches no targeted module")
    return problems


def _modules_to_save(inv: Inventory, config) -> tuple[int, list[str]]:
    """PEFT `_set_trainable`: each module whose name ends with an entry gets a trainable full copy."""
    entries = list(config.modules_to_save or [])
    if not entries:
        return 0, []
    names = inv.modules.loc[inv.modules["kind"] != "param", "name"].tolist()
    numel = dict(zip(inv.modules["name"], inv.modules["numel"]))
    hits = [n for n in names if any(n.endswith(e) for e in entries)]
    # A copy of an outer module already holds its children.
    outer = [n for n in hits if not any(n.startswith(f"{h}.") for h in hits if h != n)]
    missing = [e for e in entries if not any(n.endswith(e) for n in names)]
    warnings = [f"`modules_to_save` entry {short_repr(e)} matches no module" for e in missing]
    return int(sum(numel[n] for n in outer)), warnings


def _no_match_message(inv: Inventory, settings: LoraSettings, excluded: int) -> str:
    if excluded:
        return "`exclude_modules`/`modules_to_save` exclude every module `target_modules` matches: nothing would be adapted"
    if settings.layers_to_transform is not None:
        return (
            f"`layers_to_transform` {settings.layers_to_transform} leaves no targeted module: "
            f"{inv.spec.model_id} has layers 0-{inv.facts['layers'] - 1}"
        )
    target = settings.target_modules
    if isinstance(target, str) and target != ALL_LINEAR and re.fullmatch(r"[\w.]+", target):
        hint = f" (a string is a regex on the full name: use [{target!r}] or '.*{target}')"
    else:
        hint = ""
    return (
        f"`target_modules` {_show(target)} matches no module of {inv.spec.model_id}{hint}; "
        f"names that would match: {', '.join(adaptable_leaf_names(inv))}"
    )


def _unused_entry_warnings(settings: LoraSettings, names: list[str]) -> list[str]:
    if not isinstance(settings.target_modules, tuple):
        return []
    unused = [t for t in settings.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    return [f"`target_modules` entry {short_repr(t)} matches no module" for t in unused]


def adaptable_leaf_names(inv: Inventory) -> list[str]:
    """Sorted leaf names of the modules LoRA can wrap (what a target list may name)."""
    names = inv.modules.loc[inv.modules["kind"].isin(SUPPORTED_KINDS), "name"]
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def matched_module_names(model: str | ModelSpec | Inventory, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """(adapted, left out): the full names PEFT adapts under `settings`, and the adaptable ones it
    leaves alone (e.g. the output head under `"all-linear"`)."""
    problems = settings.problems()  # a bad regex is a message here too, never a re.error
    if problems:
        raise LoraSettingsError(problems)
    inv = as_inventory(model)
    plan = _plan(inv, _plan_key(settings, inv))
    adapted = plan.arrays["name"].tolist()
    chosen = set(adapted)
    left = [n for n in inv.names(SUPPORTED_KINDS) if n not in chosen]
    return adapted, left


def _show(target: Any) -> str:
    return short_repr(list(target) if isinstance(target, tuple) else target, 200)


def rank_curve(model: str | ModelSpec | Inventory, settings: LoraSettings, ranks) -> pd.DataFrame:
    """Trainable parameters (and percent) of `settings` with `r` set to each of `ranks`.

    A count is affine in `r` (modules under a rank_pattern keep their rank; every other adapted
    module grows by r * (in + out)), so two exact counts give every rank exactly. Returns columns
    `rank`, `trainable_params`, `percent`.
    """
    inv = as_inventory(model)
    one = count_lora_params(inv, settings.replace(r=1))
    two = count_lora_params(inv, settings.replace(r=2))
    ranks = np.asarray(list(ranks), dtype=np.int64)
    slope = two.trainable_params - one.trainable_params
    trainable = one.trainable_params + slope * (ranks - 1)
    all_params = one.all_params + (two.all_params - one.all_params) * (ranks - 1)
    return pd.DataFrame({"rank": ranks, "trainable_params": trainable, "percent": 100.0 * trainable / all_params})
