"""One LoRA settings object with PEFT's own field names and meanings.

What the app shows, counts, trains and exports is this object; it converts to and from a PEFT
`adapter_config.json` dict and to `peft.LoraConfig` without renaming anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from lora_core.errors import InputError, is_int, is_number, one_line, positive_int_problem, short_repr
from lora_core.options import BIASES, Bias, choice_problem

if TYPE_CHECKING:
    import torch

ALL_LINEAR = "all-linear"
# Beyond any useful rank (the widest real layers are ~16k-54k wide): keeps every count inside int64.
MAX_RANK = 1 << 16
# Layer indices stop here, and so do a config's layers (models.SIZE_LIMITS).
MAX_LAYER = 1024
# A regex over module names; anything longer is a paste accident or an attack.
MAX_REGEX_CHARS = 1000
TargetSpec = tuple[str, ...] | str | None

# Fields of `peft.LoraConfig` that this object models; every other LoraConfig field is carried
# verbatim in `peft_extras` so an imported adapter_config.json exports unchanged.
MODELLED_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "use_rslora",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "task_type",
)
# Keys PEFT writes that describe the file, not the adapter.
_FILE_KEYS = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "peft_version"}
# Options PEFT's ParamWrapper (the LoRA layer on a parameter, as `target_parameters` makes) raises on.
PARAM_WRAPPER_REFUSES = ("lora_dropout", "use_dora", "lora_bias")


class LoraSettingsError(InputError):
    """Every problem found in one settings object, raised once; `problems` lists them."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyperparameters, named and defaulted exactly as in `peft.LoraConfig`.

    `target_modules` is a tuple of names (exact full name or `.`-suffix, as PEFT matches a list),
    a regex string (PEFT `re.fullmatch`es it on the full module name), `"all-linear"`, or None
    (PEFT's default targets for the model type).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    target_parameters: tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    bias: Bias = "none"
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    peft_extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A value of the wrong type is refused here, once, with its field named: everything after
        # (sorting, hashing, PEFT) may then rely on the types. Ranges are `problems()`' business,
        # so a sidebar can hold r=0 and say why it cannot be counted.
        wrong = _type_problems({name: getattr(self, name) for name in MODELLED_FIELDS})
        if wrong:
            raise LoraSettingsError(wrong)
        if not isinstance(self.peft_extras, Mapping) and self.peft_extras is not None:
            raise LoraSettingsError([f"`peft_extras` must be a mapping, got {short_repr(self.peft_extras)}"])
        if self.peft_extras and not _is_json(self.peft_extras):  # exported and hashed as JSON
            raise LoraSettingsError(
                [
                    f"`peft_extras` must hold JSON values, as adapter_config.json does, got {short_repr(self.peft_extras)}"
                ]
            )
        # Lists become tuples so equal settings compare and hash equal. PEFT turns target,
        # exclude and parameter lists into sets, so their order means nothing: sort them.
        for name in ("target_modules", "exclude_modules", "target_parameters"):
            value = getattr(self, name)
            if name == "target_parameters" and isinstance(value, str):
                value = (value,)
            if isinstance(value, (list, tuple, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(set(value), key=str)))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        for name in ("modules_to_save", "layers_pattern", "layers_to_transform"):
            value = getattr(self, name)
            if isinstance(value, (list, set, frozenset)):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        object.__setattr__(self, "peft_extras", dict(self.peft_extras or {}))

    def __hash__(self) -> int:
        # dict fields make the generated hash fail; hash a canonical JSON form instead.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def replace(self, **changes: Any) -> LoraSettings:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        """`lora_scale` of these settings, or of rank `r` / alpha `alpha` where given."""
        return lora_scale(self.r if r is None else r, self.lora_alpha if alpha is None else alpha, self.use_rslora)

    def problems(self) -> list[str]:
        """Problems that need no model: the checks PEFT lacks or makes only deep inside `get_peft_model`.

        Types come first (`_type_problems`): a value of the wrong type is named once and not
        checked further, so nothing below compares or compiles a value of the wrong kind."""
        found = _type_problems({name: getattr(self, name) for name in MODELLED_FIELDS})
        if found:
            return found
        if problem := positive_int_problem("r", self.r, MAX_RANK):
            found.append(problem)
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            found.append(f"`lora_alpha` must be > 0, got {self.lora_alpha!r}")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            found.append(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if problem := choice_problem("bias", self.bias, BIASES):
            found.append(problem)
        for key, value in self.rank_pattern.items():
            if problem := positive_int_problem(f"rank_pattern[{short_repr(key)}]", value, MAX_RANK):
                found.append(problem)
        for key, alpha in self.alpha_pattern.items():
            if not is_number(alpha) or alpha <= 0:
                found.append(f"`alpha_pattern[{short_repr(key)}]` must be > 0, got {short_repr(alpha)}")
        found += _regex_problems(self)
        if isinstance(self.target_modules, tuple) and not self.target_modules and not self.target_parameters:
            found.append("`target_modules` is empty: name at least one module, a regex or 'all-linear'")
        if self.layers_to_transform is not None:
            layers = (
                (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            )
            if any(not is_int(i) or not 0 <= i < MAX_LAYER for i in layers):
                found.append(
                    f"`layers_to_transform` must hold layer indices from 0 to {MAX_LAYER - 1}, got {short_repr(self.layers_to_transform)}"
                )
            if isinstance(self.target_modules, str):
                found.append(
                    "`layers_to_transform` cannot be used with a regex or 'all-linear' `target_modules`: give a list"
                )
        if self.layers_pattern and self.layers_to_transform is None:
            found.append("`layers_pattern` only has an effect together with `layers_to_transform`")
        if self.target_parameters:
            found += param_wrapper_problems(self, "`target_parameters`")
        if not found:  # the rest is PEFT's own word, asked only of settings that pass every check above
            found += _peft_problems(self)
        return found

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json dict PEFT writes for these settings, sets and lists sorted so the
        file is stable; loads back with `LoraConfig.from_pretrained`."""
        config = self.to_peft_config()
        data = config.to_dict()
        for key, value in data.items():
            if isinstance(value, (set, frozenset)):
                data[key] = sorted(value)
        if isinstance(data.get("target_modules"), list) and isinstance(self.target_modules, tuple):
            data["target_modules"] = sorted(self.target_modules)
        data["peft_type"] = "LORA"
        return dict(sorted(data.items()))

    def to_peft_config(self):
        """A fresh `peft.LoraConfig` (never shared: `get_peft_model` mutates the one it gets).
        Raises `LoraSettingsError` listing `problems()` when there are any."""
        problems = self.problems()
        if problems:
            raise LoraSettingsError(problems)
        return self._build_peft_config()

    def _build_peft_config(self):
        from peft import LoraConfig

        kwargs = {name: getattr(self, name) for name in MODELLED_FIELDS}
        for name in ("target_modules", "exclude_modules", "target_parameters", "modules_to_save", "layers_pattern"):
            if isinstance(kwargs[name], tuple):
                kwargs[name] = list(kwargs[name])
        if isinstance(kwargs["layers_to_transform"], tuple):
            kwargs["layers_to_transform"] = list(kwargs["layers_to_transform"])
        kwargs["rank_pattern"] = dict(self.rank_pattern)
        kwargs["alpha_pattern"] = dict(self.alpha_pattern)
        kwargs.update(self.peft_extras)
        return LoraConfig(**kwargs)

    def to_json(self) -> str:
        """`to_peft_dict` as indented, key-sorted JSON."""
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> LoraSettings:
        """Settings from an adapter_config.json dict. Keys LoraConfig does not know are ignored (see
        `unknown_keys`); known LoraConfig fields this object does not model ride along in `peft_extras`.

        Raises `LoraSettingsError` when the dict is not a LoRA config or a value has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise LoraSettingsError([f"an adapter config must be a JSON object, got {type(data).__name__}"])
        peft_type = data.get("peft_type", "LORA")
        if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise LoraSettingsError([f"`peft_type` is {peft_type!r}; only LORA configs are supported"])
        defaults = _lora_config_defaults()
        kwargs: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for key, value in data.items():
            if key in MODELLED_FIELDS:
                kwargs[key] = value
            elif key in defaults and key not in _FILE_KEYS and value != defaults[key]:
                extras[key] = value
        problems = _type_problems(kwargs)
        if problems:
            raise LoraSettingsError(problems)
        if kwargs.get("task_type") is not None:
            kwargs["task_type"] = str(getattr(kwargs["task_type"], "value", kwargs["task_type"]))
        for name in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(name) is None:
                kwargs.pop(name, None)
        return cls(**kwargs, peft_extras=extras)

    @classmethod
    def from_json(cls, text: str | bytes) -> LoraSettings:
        """Settings from adapter_config.json text; malformed JSON raises `LoraSettingsError`."""
        return cls.from_peft_dict(parse_json(text))

    @classmethod
    def from_peft_config(cls, config) -> LoraSettings:
        """Settings from a `peft.LoraConfig`."""
        return cls.from_peft_dict(config.to_dict())


@overload
def lora_scale(r: int, lora_alpha: float, use_rslora: bool = False) -> float: ...
@overload
def lora_scale(r: int | np.ndarray, lora_alpha: float | np.ndarray, use_rslora: bool = False) -> np.ndarray: ...
def lora_scale(
    r: int | np.ndarray, lora_alpha: float | np.ndarray | torch.Tensor, use_rslora: bool = False
) -> float | np.ndarray | torch.Tensor:
    """The factor PEFT's `LoraLayer.update_layer` puts on the LoRA branch: `lora_alpha / r` (Hu et al.
    2021), or `lora_alpha / math.sqrt(r)` with rsLoRA (Kalajdzievski 2023).

    `r` is an int or a numpy array of ranks, `lora_alpha` a number, a numpy array or a torch tensor;
    arrays go elementwise. In float64 every form is PEFT's value to the bit: a square root is
    correctly rounded in `math` and numpy alike (`r ** 0.5` goes through `pow`, which is not)."""
    if not use_rslora:
        return lora_alpha / r
    return lora_alpha / (np.sqrt(r) if isinstance(r, np.ndarray) else math.sqrt(r))


def scale_formula(use_rslora: bool) -> str:
    """`lora_scale`'s formula as users read it."""
    return "alpha/sqrt(r)" if use_rslora else "alpha/r"


def param_wrapper_problems(settings: LoraSettings, adapted: str) -> list[str]:
    """One problem for each option of `settings` PEFT's ParamWrapper refuses, for a config that
    adapts parameters (`adapted` says which, e.g. "`target_parameters`")."""
    return [
        f"`{name}` is not supported with {adapted} (PEFT ParamWrapper refuses it)"
        for name in PARAM_WRAPPER_REFUSES
        if getattr(settings, name)
    ]


def parse_targets(text: str) -> tuple[str, ...] | str:
    """Target modules as users type them (the CLI's --targets, the sidebar's custom field):
    `q_proj, v_proj` -> a tuple of names; `all-linear` (any case) as PEFT's shortcut; `re:REGEX` ->
    the regex string PEFT full-matches against module names."""
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    if text.lower() == ALL_LINEAR:
        return ALL_LINEAR
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_json(text: str | bytes) -> Any:
    """JSON text (or UTF-8 bytes) as data; anything else raises `LoraSettingsError` in one line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise LoraSettingsError(["not a text file: give the adapter_config.json itself"]) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise LoraSettingsError([f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"]) from None
    except RecursionError:
        raise LoraSettingsError(["not valid JSON: nested too deeply"]) from None


def _refuse_constant(name: str) -> Any:
    """Python's json takes NaN and Infinity, which JSON does not: refused, so no value read here
    can make an export invalid JSON."""
    raise LoraSettingsError([f"not valid JSON: {name} is not a JSON number"])


def unknown_keys(data: Mapping[str, Any]) -> list[str]:
    """Keys of an adapter_config.json dict that `peft.LoraConfig` does not know (dropped on import)."""
    known = _lora_config_fields() | _FILE_KEYS
    return sorted(key for key in data if key not in known)


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


@functools.cache
def _lora_config_defaults() -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig().to_dict()


def _type_problems(kwargs: Mapping[str, Any]) -> list[str]:
    """Fields whose value has the wrong type, each named with what it must be."""
    problems = []
    for name in ("rank_pattern", "alpha_pattern"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, Mapping):
            problems.append(f"`{name}` must be an object mapping regex keys to numbers, got {short_repr(value)}")
        elif value and any(not isinstance(key, str) or not key for key in value):
            problems.append(f"`{name}` keys must be non-empty strings (regexes on module names)")
    for name in ("target_modules", "exclude_modules"):
        value = kwargs.get(name)
        if value is not None and not isinstance(value, (str, list, tuple, set, frozenset)):
            problems.append(f"`{name}` must be a list of names or a regex string, got {short_repr(value)}")
        elif isinstance(value, (list, tuple, set, frozenset)) and any(not isinstance(v, str) or not v for v in value):
            problems.append(f"`{name}` must hold non-empty strings only, got {short_repr(value)}")
    for name in ("target_parameters", "modules_to_save", "layers_pattern"):
        value = kwargs.get(name)
        strings = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
        if value is not None and not (strings or (isinstance(value, str) and value)):
            problems.append(f"`{name}` must be a list of names, got {short_repr(value)}")
    layers = kwargs.get("layers_to_transform")
    if layers is not None and not (is_int(layers) or (isinstance(layers, (list, tuple)) and all(map(is_int, layers)))):
        problems.append(f"`layers_to_transform` must be a layer index or a list of them, got {short_repr(layers)}")
    if "r" in kwargs and not is_int(kwargs["r"]):  # its range is `problems()`' business
        problems.append(f"`r` must be a positive integer, got {short_repr(kwargs['r'])}")
    for name in ("lora_alpha", "lora_dropout"):
        if name in kwargs and not is_number(kwargs[name]):
            problems.append(f"`{name}` must be a finite number, got {short_repr(kwargs[name])}")
    for name in ("use_rslora", "use_dora", "lora_bias"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            problems.append(f"`{name}` must be true or false, got {short_repr(kwargs[name])}")
    task = kwargs.get("task_type")
    if task is not None and not isinstance(task, str) and not isinstance(getattr(task, "value", None), str):
        problems.append(f"`task_type` must be a string such as 'CAUSAL_LM', got {short_repr(task)}")
    return problems


def _peft_problems(settings: LoraSettings) -> list[str]:
    """What `peft.LoraConfig` itself refuses, found by building it (about 10 us): combinations such
    as DoRA with `lora_bias`, and the LoraConfig fields carried unmodelled in `peft_extras` (e.g.
    a malformed `eva_config`). Its checks raise TypeError, ValueError or worse; any of them means
    PEFT refuses the config."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings._build_peft_config()
    except Exception as error:  # whatever LoraConfig.__post_init__ raises is its refusal
        return [
            f"PEFT's LoraConfig refuses these settings ({type(error).__name__}: {short_repr(one_line(error), 160)})"
        ]
    return []


def _regex_problems(settings: LoraSettings) -> list[str]:
    """Every regex PEFT compiles (a string `target_modules` / `exclude_modules`, `rank_pattern` and
    `alpha_pattern` keys, `layers_pattern`), compiled here first so a bad one is a message, not a
    traceback deep inside matching."""
    found = []
    for name in ("target_modules", "exclude_modules"):
        value = getattr(settings, name)
        if isinstance(value, str) and value != ALL_LINEAR:
            found += _compile_problem(name, value)
    # PEFT embeds these in larger patterns (`get_pattern_key`, `check_target_module_exists`): a key
    # like `(?i)q_proj` compiles alone but not inside them, so the embedded forms are compiled.
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(settings, name):
            found += _compile_problem(f"{name} key", key, rf"(.*\.)?({key})$")
    for name in settings.modules_to_save or ():  # PEFT's check_target_module_exists matches these as regexes
        found += _compile_problem("modules_to_save", name, rf"(^|.*\.){name}($|\..*)")
    patterns = settings.layers_pattern
    for pattern in (patterns,) if isinstance(patterns, str) else patterns or ():
        found += _compile_problem("layers_pattern", pattern, rf".*\.{pattern}\.(\d+)\.")
    return found


def _compile_problem(what: str, pattern: str, embedded: str | None = None) -> list[str]:
    if len(pattern) > MAX_REGEX_CHARS:
        return [
            f"`{what}` is {len(pattern):,} characters long; a module regex needs far fewer (at most {MAX_REGEX_CHARS:,})"
        ]
    try:
        re.compile(pattern)
        if embedded is not None:
            re.compile(embedded)
        if _nested_repeat(pattern):
            return [
                f"`{what}` {short_repr(pattern)} repeats a repeat (like `(a+)+`), which can take exponential "
                "time to match: drop the outer repeat or use `.*`"
            ]
    except (re.error, RecursionError, OverflowError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        return [f"`{what}` {short_repr(pattern)} is not a valid regex ({reason}): fix or escape it"]
    return []


def _nested_repeat(pattern: str) -> bool:
    """Whether `pattern` repeats a body made of an unbounded repeat and nothing a match must
    contain (`(a+)+`, `(.*)*`, `(\\w+\\s?)+`), or of overlapping alternatives (`(.|.)*`,
    `(a|aa)+`): Python's `re`, which PEFT matches with, can then split a name among the
    iterations in exponentially many ways, and one such regex in a shared
    server pins a thread for minutes. A body with a required part between iterations
    (`(\\w+\\.)*`, `(x+y)+`) cannot be split that way and passes."""
    try:
        from re import _constants as constants  # type: ignore[attr-defined]  # Python 3.11+
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as constants  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)}

    def unbounded(item) -> bool:
        return item[0] in repeats and (item[1][1] == constants.MAXREPEAT or item[1][1] > 64)

    def ambiguous(body) -> bool:
        items = list(body.data)
        while len(items) == 1 and items[0][0] == constants.SUBPATTERN:  # (?:...) and (...) around it
            body = items[0][1][3]
            items = list(body.data)
        inner = [item for item in items if unbounded(item)]
        required = [item for item in items if parser.SubPattern(body.state, [item]).getwidth()[0] > 0]
        if inner and all(item in inner for item in required):
            return True
        # Alternatives one iteration can split in two ways: `(.|.)`, `(a|aa)` (the parser factors
        # out the shared prefix, leaving equal or empty branches).
        for op, value in items:
            if op == constants.BRANCH:
                branches = [str(list(branch)) for branch in value[1]]
                if len(set(branches)) < len(branches) or any(not list(branch) for branch in value[1]):
                    return True
        return False

    def walk(node) -> bool:
        if isinstance(node, parser.SubPattern):
            return any(walk(item) for item in node.data)
        if isinstance(node, tuple) and len(node) == 2 and node[0] in repeats:
            body = node[1][2]
            return (unbounded(node) and ambiguous(body)) or walk(body)
        if isinstance(node, (list, tuple)):
            return any(walk(child) for child in node)
        return False

    return walk(parser.parse(pattern))


def _is_json(value: Any) -> bool:
    """Whether `value` is plain JSON (no bytes, sets, objects, NaN, or nesting beyond the recursion limit)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True
