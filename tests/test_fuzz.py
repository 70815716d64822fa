"""Fuzz suite: generated values thrown at every input path (settings, the adapter_config importer,
the shareable-link parser, the model-config loader, every CLI subcommand).

The contract under test: each call gives a valid result or the engine's own `InputError` with a
one-line message; never another exception, never a hang, never a negative count. The CLI returns 0
or 2 (then exactly one `error:` line on stderr), never raises and never prints a traceback; `train`
with bad input exits 2 before a run exists (and no fuzz case ever trains: `_train` is stubbed).

Deterministic by default (`derandomize`, so CI never flakes). `FUZZ_EXAMPLES=500` runs that many
examples per test with fresh randomness; a failure then prints a `@reproduce_failure` blob.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from lora_core import cli, training
from lora_core.counting import count_lora_params
from lora_core.errors import InputError
from lora_core.export import import_config
from lora_core.models import CATALOGUE_DIR, SIZE_LIMITS, catalogue_ids, inventory, resolve_model, spec_from_text
from lora_core.options import BIASES
from lora_core.settings import MAX_RANK, MODELLED_FIELDS, LoraSettings, parse_targets

ROOT = Path(__file__).resolve().parents[1]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 0)
# Generous: a hang guard, not a benchmark. The slowest legal input (a 1024-layer config counted
# with all-linear) takes ~13 s on a 2-core machine; 30 s leaves room for a loaded CI runner.
DEADLINE_S = float(os.environ.get("FUZZ_DEADLINE_S") or 30)
HANG_S = 2 * DEADLINE_S  # hard stop (SIGALRM) for a case that never returns
HANG_AGAIN_S = 5.0

settings.register_profile(
    "lora-fuzz",
    derandomize=not FUZZ_EXAMPLES,
    database=None,  # nothing written into the checkout
    deadline=DEADLINE_S * 1000,
    print_blob=bool(FUZZ_EXAMPLES),
    # No `explain` phase: it re-runs a failing case dozens of times (minutes for a CLI case).
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    # Generating a few kB of argv / JSON text is not slow, but the first example of a test pays
    # for building meta-device models; Hypothesis counts that against generation.
    suppress_health_check=[HealthCheck.too_slow],
)


def fuzz(examples: int):
    """The suite's profile with `examples` examples (or $FUZZ_EXAMPLES)."""
    return settings(settings.get_profile("lora-fuzz"), max_examples=FUZZ_EXAMPLES or examples)


SMALL_MODELS = ("facebook/opt-125m", "openai-community/gpt2", "mistralai/Mixtral-8x7B-v0.1")


@pytest.fixture(scope="module", autouse=True)
def _sandbox(tmp_path_factory):
    """Runs land in a temporary data dir, the Hub is off, nothing ever trains, and the small
    models are built once so the first example of each test is not charged for it."""
    data = tmp_path_factory.mktemp("fuzz-data")
    reached: list[str] = []

    def no_training(store, run_id, config, settings, cancel, base_models=None):
        reached.append(f"run {run_id}: {config}")
        raise training.TrainingError("fuzz: training was reached")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORA_EXPLORER_DATA", str(data / "default"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(training.run, "_train", no_training)
        for model in SMALL_MODELS:
            inventory(resolve_model(model))
        yield types.SimpleNamespace(root=data, reached=reached)
    assert not reached, f"a fuzz case reached training: {reached}"


# --- checks ----------------------------------------------------------------------------------------


class Hang(AssertionError):
    pass


# Tests whose cases get HANG_AGAIN_S: those that already had a hang, and the reproducers below.
_HUNG: set[str] = set()


class hang_guard:
    """Fail a case still running after HANG_S seconds (SIGALRM interrupts Python code and `re`
    matching). It fires again every second should the code under test swallow the exception.
    Once a test has hung, its later cases (Hypothesis shrinking the hang) get HANG_AGAIN_S, so a
    hang costs a CI run about a minute or two, not one HANG_S per shrink step."""

    def __init__(self, what: str) -> None:
        self.what, self.fired, self.armed = what, False, False
        self.test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        self.limit = HANG_AGAIN_S if self.test in _HUNG else HANG_S

    def _alarm(self, signum, frame) -> None:
        self.fired = True
        _HUNG.add(self.test)
        raise Hang(f"{self.what}: still running after {self.limit:.0f} s")

    def __enter__(self) -> hang_guard:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            self.previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.limit, 1.0)
            self.armed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        if self.fired and not isinstance(exc, Hang):
            raise Hang(f"{self.what}: ran over {self.limit:.0f} s (the timeout was swallowed)")


def assert_one_line(error: BaseException) -> None:
    """The engine's own error type, with a non-empty one-line message."""
    if not isinstance(error, InputError):
        raise AssertionError(f"not an InputError: {type(error).__module__}.{type(error).__name__}") from error
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert len(message.splitlines()) == 1 and "\n" not in message, f"message is not one line: {message!r}"


def outcome(error: InputError | None) -> None:
    """Label a case for `--hypothesis-show-statistics` (how many reach a valid result)."""
    if currently_in_test_context():  # not when a reproducer below calls a test body directly
        event("valid" if error is None else f"refused: {type(error).__name__}")


@contextlib.contextmanager
def input_error_allowed():
    """Let an InputError end the case (after checking it); anything else propagates."""
    try:
        yield
    except InputError as error:
        assert_one_line(error)


def assert_counts(result) -> None:
    """A CountResult with non-negative, consistent counts."""
    for name in ("trainable_params", "all_params", "base_params", "lora_params", "bias_params", "saved_module_params"):
        value = getattr(result, name)
        assert isinstance(value, int) and value >= 0, (name, value)
    assert result.trainable_params <= result.all_params, (result.trainable_params, result.all_params)
    assert 0 <= result.percent_trainable <= 100
    if len(result.modules):
        assert (result.modules["params"] >= 0).all()
        assert (result.modules["rank"] > 0).all()
    json.dumps(result.to_dict(), allow_nan=False)


COUNT_KEY = re.compile(r"params|bytes|_mb$|mib|gib|percent|^modules$|^rank$|tokens")


def assert_no_negative_counts(data, path: str = "") -> None:
    """Every count in a JSON answer is a finite number >= 0 (or null)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and COUNT_KEY.search(str(key)):
                assert math.isfinite(value) and value >= 0, f"{path}.{key} = {value!r}"
            assert_no_negative_counts(value, f"{path}.{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            assert_no_negative_counts(value, f"{path}[{i}]")


# --- value strategies ------------------------------------------------------------------------------

BIG_INTS = [0, -1, 10**30, -(10**30), 2**63, 2**63 - 1, -(2**63) - 1, 2**64, MAX_RANK, MAX_RANK + 1, 10**400]
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 1e-300, 0.999999999, 1.0, -1.5]
BAD_REGEXES = ["[", "(?P<", "*a", "(", ")", "a{2,1}", "\\", "(?<=a+)b", "(?P<x>a)(?P<x>b)", "x**", "[z-a]", "(?i"]
BAD_REGEXES += ["\\p{L}", "a{99999999999999999999}", "(" * 300 + ")" * 300, "(?#", "(?P=nope)", "\\9"]
# Catastrophic backtracking: PEFT re.fullmatch()es a string target on every module name.
REDOS = ["(.*)*z", "(.*.*)*z", "(.|.)*z", r"(.|\w)*Z", "(x+x+)+y"]
ODD_TEXT = ["", " ", "\t", "\x00", "a\nb", "\r\n", "../../etc/passwd", "/", "~", "é", "\u202e", "\udcff"]
ODD_TEXT += ["\u2028", "\x85", "NaN", "None", "null", "true", "{}", "[]", "%s%n", "' OR 1=1 --", "a" * 5000]


def nested(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class Deep:
    """A list nested `depth` deep, built by `realise` only after Hypothesis has stored the example
    (Hypothesis' own printer cannot show one 5000 deep)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def __repr__(self) -> str:
        return f"nested({self.depth})"


def realise(value):
    """`value` with every `Deep` marker replaced by the nested list it stands for."""
    if isinstance(value, Deep):
        return nested(value.depth)
    if isinstance(value, dict):
        return {realise(k): realise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [realise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(realise(v) for v in value)
    return value


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(BIG_INTS),
    st.floats(),
    st.sampled_from(ODD_FLOATS),
    st.text(max_size=12),
    st.sampled_from(ODD_TEXT),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# What the Python API can be handed besides JSON: tuples, sets, bytes, objects, deep nesting.
anything = st.one_of(
    json_values,
    st.binary(max_size=8),
    st.tuples(st.integers(), st.text(max_size=4)),
    st.frozensets(st.text(max_size=4), max_size=3),
    st.sampled_from([Deep(3), Deep(60), Deep(5000), object(), type, print, range(3), 1j]),
)


def mostly(valid, hostile, hostile_percent: int = 20):
    """`valid`, or `hostile` in about `hostile_percent`% of draws (shrinking towards `valid`).
    `one_of` cannot weight: it picks its branches about equally, whatever is repeated."""
    return st.integers(0, 99).flatmap(lambda k: hostile if k >= 100 - hostile_percent else valid)


MODULE_NAMES = ["q_proj", "v_proj", "k_proj", "o_proj", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "gate_proj"]
MODULE_NAMES += ["up_proj", "down_proj", "lm_head", "embed_tokens", "wte", "out_proj", "self_attn.q_proj", "w1"]
module_names = st.sampled_from([*MODULE_NAMES, "nothing", "experts"])
good_regexes = st.sampled_from(
    [".*proj", r".*\.(q|v)_proj", ".*attn.*", "model.*", ".*", r".*\.fc[12]", r"transformer\.h\.\d+\.attn\.c_attn"]
)
regexes = st.one_of(good_regexes, st.sampled_from(BAD_REGEXES), st.text(max_size=8))
targets = mostly(
    st.one_of(
        st.lists(module_names, min_size=1, max_size=4),
        st.just("all-linear"),
        good_regexes,
        st.none(),
        st.lists(module_names, max_size=4).map(tuple),
    ),
    st.one_of(
        regexes,
        st.sampled_from(REDOS),
        st.lists(st.one_of(module_names, regexes, st.text(max_size=5), anything), max_size=3),
        anything,
    ),
)
param_names = st.sampled_from(["experts.gate_up_proj", "experts.down_proj", "mlp.experts.gate_up_proj", "weight"])
patterns = st.dictionaries(
    st.one_of(module_names, regexes, st.sampled_from(REDOS)),
    mostly(st.integers(1, 64), st.one_of(st.sampled_from(BIG_INTS), st.floats(), anything)),
    max_size=3,
)
layer_lists = st.one_of(
    st.integers(0, 40), st.lists(st.integers(0, 40), min_size=1, max_size=5), st.sampled_from(BIG_INTS)
)


def lora_fields(extra_keys: bool = False):
    """kwargs for LoraSettings (or, with `extra_keys`, an adapter_config.json dict): each field
    absent, valid, near-valid or of any type."""
    fields = {
        "r": mostly(st.integers(1, 64), st.one_of(st.sampled_from(BIG_INTS), st.integers(), anything)),
        "lora_alpha": mostly(
            st.one_of(st.integers(1, 128), st.floats(0.5, 256)), st.one_of(st.sampled_from(ODD_FLOATS), anything)
        ),
        "lora_dropout": mostly(st.floats(0, 0.5), st.one_of(st.sampled_from(ODD_FLOATS), anything)),
        "target_modules": targets,
        "exclude_modules": mostly(st.none(), targets),
        "target_parameters": mostly(
            st.none(), st.one_of(st.lists(st.one_of(param_names, regexes), max_size=2), anything)
        ),
        "rank_pattern": mostly(st.just({}), st.one_of(patterns, anything)),
        "alpha_pattern": mostly(st.just({}), st.one_of(patterns, anything)),
        "layers_to_transform": mostly(st.none(), st.one_of(layer_lists, anything)),
        "layers_pattern": mostly(st.none(), st.one_of(st.sampled_from(["layers", "h", "block"]), regexes, anything)),
        "use_rslora": mostly(st.booleans(), anything),
        "use_dora": mostly(st.booleans(), anything),
        "bias": mostly(st.sampled_from(["none", "all", "lora_only"]), st.one_of(st.text(max_size=6), anything)),
        "lora_bias": mostly(st.booleans(), anything),
        # PEFT matches modules_to_save entries as regexes too (check_target_module_exists)
        "modules_to_save": mostly(
            st.none(), st.one_of(st.lists(st.one_of(module_names, regexes), max_size=2), anything)
        ),
        "task_type": mostly(
            st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]),
            st.one_of(st.text(max_size=6), anything),
        ),
    }
    assert set(fields) == set(MODELLED_FIELDS), "a LoraSettings field is not fuzzed"
    # Known LoraConfig fields this object does not model: carried in peft_extras to PEFT itself.
    extras = {
        "init_lora_weights": mostly(
            st.sampled_from([True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda"]),
            st.one_of(st.text(max_size=6), anything),
        ),
        "fan_in_fan_out": mostly(st.booleans(), anything),
        "layer_replication": mostly(st.none(), st.one_of(st.lists(st.tuples(st.integers(), st.integers())), anything)),
        "use_qalora": mostly(st.booleans(), anything),
        "trainable_token_indices": mostly(st.none(), anything),
        "ensure_weight_tying": mostly(st.booleans(), anything),
        "inference_mode": mostly(st.booleans(), anything),
    }
    if not extra_keys:
        peft_extras = mostly(st.just({}), st.fixed_dictionaries({}, optional=extras), hostile_percent=40)
        return st.fixed_dictionaries({}, optional={**fields, "peft_extras": st.one_of(peft_extras, anything)})
    file_keys = {
        "peft_type": mostly(st.just("LORA"), st.one_of(st.sampled_from(["lora", "PREFIX_TUNING", "IA3"]), anything)),
        "base_model_name_or_path": st.one_of(st.sampled_from(catalogue_ids()), st.text(max_size=10), anything),
        "revision": st.one_of(st.none(), anything),
        "auto_mapping": st.one_of(st.none(), anything),
    }
    known = st.fixed_dictionaries({}, optional={**fields, **extras, **file_keys})
    unknown = st.dictionaries(st.text(max_size=10), json_values, max_size=3)
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


def as_json(data, **kwargs) -> str:
    """JSON text for generated data (NaN/Infinity allowed, as json.loads reads them); values JSON
    cannot hold (bytes, objects) become their repr, nesting too deep to write becomes null."""
    try:
        return json.dumps(data, default=repr, **kwargs)
    except (ValueError, RecursionError):
        return "null"


def show(value, limit: int = 300) -> str:
    """repr for a failure message, whatever the value."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__} too deep to show>"
    return text[:limit]


def deep_json(depth: int) -> str:
    return '{"r": ' + "[" * depth + "]" * depth + "}"


adapter_dicts = lora_fields(extra_keys=True)
adapter_payloads = st.one_of(
    adapter_dicts.map(as_json),
    adapter_dicts.map(as_json).map(str.encode),
    adapter_dicts.map(lambda d: as_json(d).encode("utf-16")),
    adapter_dicts.map(lambda d: "\ufeff" + as_json(d)),
    st.builds(
        lambda d, model: as_json({"lora_explorer_version": "0.1.0", "model": model, "settings": d}),
        adapter_dicts,
        st.one_of(st.sampled_from(catalogue_ids()), json_values),
    ),
    json_values.map(as_json),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(1, 1200).map(deep_json),
    st.sampled_from([deep_json(100_000), "[" * 100_000, '{"r": 8, "target_modules": ' + "[" * 5000, "NaN"]),
)


# --- 1. LoraSettings --------------------------------------------------------------------------------


def _use_settings(settings: LoraSettings, model: str) -> None:
    """What the app and the CLI do with settings: problems, the adapter_config dict, a count."""
    problems = settings.problems()
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    for problem in problems:
        assert problem.strip() and len(problem.splitlines()) == 1, repr(problem)
    hash(settings)  # settings key every cache
    with input_error_allowed():
        data = settings.to_peft_dict()
        json.dumps(data)
        if not problems:  # what export writes loads back as the same config
            written = json.loads(json.dumps(data))
            assert LoraSettings.from_peft_dict(written).to_peft_dict() == written  # (0 == false: fine)
    try:
        result = count_lora_params(inventory(resolve_model(model)), settings)
    except InputError as error:
        assert_one_line(error)
        outcome(error)
        return
    outcome(None)
    assert not problems, f"counted settings with problems {problems}"
    assert_counts(result)


@fuzz(400)
@given(fields=lora_fields(), model=st.sampled_from(SMALL_MODELS))
def test_lora_settings_give_a_count_or_one_line_error(fields, model) -> None:
    with hang_guard(f"LoraSettings(**{show(fields)})"):
        try:
            settings = LoraSettings(**realise(fields))
        except InputError as error:
            assert_one_line(error)
            return
        _use_settings(settings, model)


# --- 2. the adapter_config importer -----------------------------------------------------------------


@fuzz(400)
@given(payload=adapter_payloads, model=st.sampled_from(SMALL_MODELS))
def test_import_config_gives_settings_or_one_line_error(payload, model) -> None:
    with hang_guard(f"import_config({show(payload)})"):
        try:
            settings, unknown, named = import_config(payload)
        except InputError as error:
            assert_one_line(error)
            return
        assert isinstance(settings, LoraSettings) and settings.problems() == []
        assert isinstance(unknown, list) and all(isinstance(key, str) for key in unknown)
        assert named is None or (isinstance(named, str) and named.strip())
        _use_settings(settings, model)


@fuzz(200)
@given(data=st.one_of(adapter_dicts, anything), model=st.sampled_from(SMALL_MODELS), as_text=st.booleans())
def test_from_peft_dict_and_from_json(data, model, as_text) -> None:
    data = realise(data)
    with hang_guard(f"from_peft_dict({show(data)})"):
        try:
            settings = LoraSettings.from_json(as_json(data)) if as_text else LoraSettings.from_peft_dict(data)
        except InputError as error:
            assert_one_line(error)
            return
        _use_settings(settings, model)


# --- 3. the shareable-link parser (pages/common/links.py) -------------------------------------------

link_numbers = st.one_of(
    st.integers(-300, 5000).map(str),
    st.floats().map(repr),
    st.floats(0, 1).map(str),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "Infinity", "1e400", "-0", "-0.0", "0x10", "1_6", "+8", " 8 "]),
    st.sampled_from(["٣", "８", "1e-400", "0.5e", "9" * 5000, "1" * 400 + ".5", "16\x00", "True", "1,5", "½"]),
)
link_values = st.one_of(link_numbers, st.text(max_size=20), st.sampled_from(ODD_TEXT + BAD_REGEXES))
link_texts = st.one_of(
    link_values,
    st.sampled_from(["Q,V", "All attention", "FFN only", "All linear", "Custom", "custom", "none", "all", "lora_only"]),
    st.sampled_from(["0", "1", "true", "re:[", "re:(?P<", "re:.*proj", "q_proj, v_proj", "all-linear", "re:"]),
)


def _common():
    from pages import common

    return common


def _assert_link_value(key: str, value) -> None:
    """A value the link parser put in the session is one the sidebar's widget can show."""
    from lora_core.strategies import STRATEGIES

    common = _common()
    if key == "lx_r":
        assert isinstance(value, int) and not isinstance(value, bool), value
        assert 1 <= value <= getattr(common, "R_MAX", 256), value
    elif key == "lx_alpha":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), value
        assert LoraSettings(lora_alpha=value).problems() == [], value
    elif key == "lx_dropout":
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), value
        assert 0 <= value <= getattr(common, "DROPOUT_MAX", 0.5), value
    elif key == "lx_strategy":
        assert value in (*STRATEGIES, common.CUSTOM), value
    elif key == "lx_custom_targets":
        assert isinstance(value, str) and value.strip(), value
        assert LoraSettings(target_modules=parse_targets(value)).problems() == [], value
    elif key in ("lx_rslora", "lx_dora"):
        assert isinstance(value, bool), value
    elif key == "lx_bias":
        assert value in BIASES, value


@fuzz(300)
@given(text=link_texts)
def test_link_parse_functions_return_a_value_or_none(text) -> None:
    common = _common()
    with hang_guard(f"link value {show(text)}"):
        for name, (_key, parse) in common.LINK_KEYS.items():
            value = parse(text)
            if value is None:
                continue
            if name in ("r",):
                assert isinstance(value, int) and not isinstance(value, bool)
            elif name in ("alpha", "dropout"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
            elif name in ("targets", "custom", "bias"):
                assert isinstance(value, str)
            elif name in ("rslora", "dora"):
                assert isinstance(value, bool)


class _FakeParams(dict):
    """`st.query_params`: str -> str (the last value of a repeated key)."""


@fuzz(200)
@given(
    params=st.dictionaries(
        st.sampled_from(["model", "r", "alpha", "dropout", "targets", "custom", "rslora", "dora", "bias", "x"]),
        st.one_of(link_texts, st.sampled_from([*SMALL_MODELS, "nobody/nothing", "../../etc/passwd", "/etc/passwd"])),
        max_size=9,
    )
)
def test_load_query_params_keeps_only_valid_values(params) -> None:
    common = _common()
    before = {"lx_spec": resolve_model(common.DEFAULT_MODEL), **common.SIDEBAR_DEFAULTS}
    state = dict(before)
    with hang_guard(f"link {show(params)}"):
        common.load_link(_FakeParams(params), state)
    for key, value in state.items():
        if key == "lx_spec":
            assert value.model_id in catalogue_ids()
            assert value.model_id == state["lx_catalogue_choice"]
        elif key == "lx_url_notice":
            assert isinstance(value, str) and value
        elif key in before and value != before[key]:
            _assert_link_value(key, value)
    if params.get("model") in catalogue_ids():
        assert state["lx_spec"].model_id == params["model"]


@pytest.mark.parametrize(
    "link",
    [
        {"r": str(10**30), "alpha": "nan", "dropout": "-0.0", "targets": "Custom", "custom": "re:(?P<", "bias": "\x00"},
        {"model": "../../etc/passwd", "r": "٣", "alpha": "1e400", "rslora": "2", "custom": "a\nb", "targets": "Q,V"},
    ],
)
def test_hostile_link_opens_the_app_with_a_notice(link) -> None:
    """Two AppTest runs (expensive): the link's values reach the real widgets."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.query_params.update(link)
    with hang_guard(f"AppTest link {link!r}"):
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    notice = " ".join(w.value for w in at.sidebar.warning)
    assert any(f"{name}=" in notice for name in link), notice  # the notice names what it ignored
    assert 1 <= at.slider(key="lx_r").value <= getattr(_common(), "R_MAX", 256)


# --- 4. the model-config loader ---------------------------------------------------------------------

CATALOGUE_CONFIGS = {
    path.stem.replace("__", "/"): json.loads(path.read_text()) for path in sorted(CATALOGUE_DIR.glob("*.json"))
}
SIZE_KEYS = [
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_local_experts",
    "num_experts_per_tok",
    "head_dim",
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "d_model",
    "d_ff",
    "d_kv",
    "num_layers",
    "num_heads",
    "n_layers",
    "n_heads",
    "dim",
    "hidden_dim",
    "ffn_dim",
    "word_embed_proj_dim",
    "max_position_embeddings",
    "n_positions",
    "type_vocab_size",
    "tie_word_embeddings",
    "model_type",
    "architectures",
]
LIMITS = sorted({limit for _, _, limit in SIZE_LIMITS})
size_values = st.one_of(
    st.integers(0, 8),
    st.integers(1, 4).map(lambda k: 64 * k),
    st.sampled_from([*LIMITS, *(limit + 1 for limit in LIMITS), *BIG_INTS]),
    st.sampled_from([1.0, 2.5, 64.0, math.nan, math.inf, -math.inf, -0.0, 1e300]),
    st.sampled_from(["12", "", None, True, False, [], {}, [64], {"a": 1}, "llama", ["LlamaForCausalLM"]]),
    anything,
)
# A mutation: (nest under text_config?, key, value) or a deletion (value None and delete=True).
mutations = st.tuples(st.sampled_from([None, "text_config", "task_specific_params"]), st.sampled_from(SIZE_KEYS))


@st.composite
def model_configs(draw):
    model = draw(st.sampled_from(sorted(CATALOGUE_CONFIGS)))
    config = json.loads(json.dumps(CATALOGUE_CONFIGS[model]))
    if draw(st.booleans()):  # most configs stay small, so a case takes a second, not ten
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in config:
                config[key] = draw(st.integers(1, 4))
    for where, key in draw(st.lists(mutations, min_size=1, max_size=4)):
        target = config
        if where is not None:
            target = config.setdefault(where, {}) if isinstance(config.get(where, {}), dict) else config
        if draw(st.integers(0, 99)) >= 90:
            target.pop(key, None)
        else:
            target[key] = draw(size_values)
    return model, config


config_payloads = st.one_of(
    model_configs().map(lambda mc: as_json(mc[1])),
    model_configs().map(lambda mc: as_json(mc[1]).encode()),
    st.binary(max_size=64),
    st.text(max_size=40),
    json_values.map(as_json),
    st.integers(1, 1200).map(lambda n: '{"model_type": "gpt2", "n_layer": 2, "x": ' + "[" * n + "]" * n + "}"),
    st.sampled_from(
        ['{"model_type": "llama"}', '{"model_type": null}', "[]", '{"model_type": "gpt2"}' + " " * 999_999]
    ),
)
config_settings = st.sampled_from(
    [
        LoraSettings(),
        LoraSettings(target_modules="all-linear"),
        LoraSettings(r=16, target_modules=("q_proj", "v_proj")),
        LoraSettings(target_modules=".*"),
        LoraSettings(target_modules=("c_attn",), layers_to_transform=(0, 1)),
        LoraSettings(target_parameters=("experts.gate_up_proj",)),
    ]
)


@fuzz(200)
@given(payload=config_payloads, lora=config_settings)
def test_model_config_loader_gives_a_model_or_one_line_error(payload, lora) -> None:
    with hang_guard(f"spec_from_text({show(payload)})"):
        try:
            spec = spec_from_text(payload, "fuzz/config")
        except InputError as error:
            assert_one_line(error)
            outcome(error)
            return
        try:
            inv = inventory(spec)
        except InputError as error:
            assert_one_line(error)
            outcome(error)
            return
        assert isinstance(inv.total_params, int) and inv.total_params >= 0
        for column in ("in_features", "out_features", "numel", "bias_numel", "experts"):
            assert (inv.modules[column] >= 0).all(), column
        assert (inv.params["numel"] >= 0).all()
        facts = inv.facts
        for key in ("layers", "total_params"):
            assert facts[key] is None or facts[key] >= 0, (key, facts[key])
        try:
            result = count_lora_params(inv, lora)
        except InputError as error:
            assert_one_line(error)
            outcome(error)
            return
        outcome(None)
        assert_counts(result)


# --- 5. every CLI subcommand ------------------------------------------------------------------------

SUBCOMMANDS = ("count", "catalogue", "strategies", "export", "memory", "train", "sweep", "search", "advise", "inspect")


def _subparsers() -> dict:
    parser = cli._build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def test_every_subcommand_is_fuzzed() -> None:
    assert set(_subparsers()) == set(SUBCOMMANDS), "a new subcommand needs a fuzz test"


def _argv_text(alphabet_excludes: str = "\x00"):
    """Text a shell can pass: anything but NUL, including undecodable bytes (surrogate-escaped)."""
    return st.one_of(
        st.text(st.characters(exclude_characters=alphabet_excludes), max_size=12),
        st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape").replace("\x00", "")),
        st.sampled_from([t for t in ODD_TEXT if "\x00" not in t]),
    )


int_texts = st.one_of(
    st.integers(-3, 70).map(str),
    st.sampled_from(["0", "-1", str(10**30), str(-(10**30)), str(2**63), "1e3", "nan", "", " 7", "0x10", "1_000"]),
    st.sampled_from(["٣", "+5", "9" * 5000, "65536", "65537", "1024", "4097", "16777217"]),
    _argv_text(),
)
float_texts = st.one_of(
    st.floats().map(repr),
    st.floats(0, 64).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0", "0", "1", "0.99", "1e-320", "", "٣", "1_0", "0x1p-3"]),
    _argv_text(),
)
targets_texts = st.one_of(
    st.sampled_from(["q_proj,v_proj", "all-linear", "ALL-LINEAR", "c_attn", "fc1,fc2", "w1", ",", " , ", "re:.*proj"]),
    st.sampled_from([f"re:{r}" for r in BAD_REGEXES if "\x00" not in r]),
    st.lists(module_names, min_size=1, max_size=3).map(",".join),
    _argv_text(),
)
pattern_texts = st.one_of(
    st.tuples(st.one_of(module_names, st.sampled_from(BAD_REGEXES)), int_texts).map("=".join),
    st.sampled_from(["fc1", "=4", "fc1=", "a=b=c", "fc1=4.5"]),
    _argv_text(),
)
layer_texts = st.one_of(
    st.sampled_from(["0", "0,1,2", "0-3", "5-1", "-3", "0-99999999", "a-b", "1023", "1024", "0-1023", "", ",", "1--2"]),
    _argv_text(),
)
MODEL_NAMES = [*SMALL_MODELS, "HuggingFaceTB/SmolLM2-135M", "google-t5/t5-base", "distilbert/distilbert-base-uncased"]
MODEL_NAMES += ["nobody/no-such-model", "", " ", "/", "/etc/passwd", "../../../../etc/passwd", "/dev/zero", "~", "."]
MODEL_NAMES += ["/proc/self/status", "a" * 5000, "embedded", "facebook/opt-125m/", "FACEBOOK/OPT-125M"]
model_names = st.sampled_from(MODEL_NAMES)


def _hostile_value_for(action, tmp: Path):
    """A strategy for one flag's value, by its type, choices and destination: any text a shell
    can pass, weighted to what breaks parsers."""
    if action.choices:
        return _argv_text()
    if action.type is int:
        return int_texts
    if action.type is float:
        return float_texts
    by_dest = {
        "model": st.one_of(model_names, model_files(tmp), _argv_text()),
        "lora": lora_files(tmp),
        "targets": targets_texts,
        "exclude": targets_texts,
        "target_parameters": st.one_of(st.sampled_from(["experts.gate_up_proj", "experts.down_proj"]), _argv_text()),
        "modules_to_save": st.one_of(st.sampled_from(["lm_head", "score", "nothing", "(", "lm_head,["]), _argv_text()),
        "rank_pattern": pattern_texts,
        "alpha_pattern": pattern_texts,
        "layers": layer_texts,
        "layers_pattern": st.one_of(st.sampled_from(["layers", "h", "(", "["]), _argv_text()),
        "dataset": st.one_of(st.sampled_from(["json_extraction", "upload:/no/such.jsonl", "hub:"]), _argv_text()),
        "device": st.sampled_from(["cpu", "cuda", "mps", "cuda:1", "banana", "", "cpu:0"]),
    }
    return by_dest.get(action.dest, _argv_text())


def _valid_value_for(action, tmp: Path):
    """A value the flag takes (most combinations of them count); so cases get past parsing."""
    if action.choices:
        return st.sampled_from(list(action.choices))
    small = {"r": (1, 64), "batch": (1, 8), "seq": (1, 2048), "eval_batch": (1, 8), "steps": (1, 100)}
    if action.type is int:
        return st.integers(*small.get(action.dest, (1, 16))).map(str)
    if action.type is float:
        if action.dest == "dropout":
            return st.floats(0, 0.5).map(str)
        return st.one_of(st.integers(1, 64).map(str), st.floats(0.01, 64).map(repr))
    by_dest = {
        "model": st.sampled_from([*SMALL_MODELS, "HuggingFaceTB/SmolLM2-135M"]),
        "lora": valid_lora_files(tmp),
        "targets": st.sampled_from(["all-linear", "re:.*proj", "q_proj,v_proj,c_attn", "q_proj,v_proj"]),
        "exclude": st.sampled_from(["lm_head", "k_proj"]),
        "target_parameters": st.just("experts.gate_up_proj"),
        "modules_to_save": st.just("lm_head"),
        "rank_pattern": st.sampled_from(["q_proj=16", "v_proj=4", "c_attn=2"]),
        "alpha_pattern": st.sampled_from(["q_proj=32", "v_proj=0.5"]),
        "layers": st.sampled_from(["0", "0-1", "0,2"]),
        "layers_pattern": st.just("layers"),
        "dataset": st.just("json_extraction"),
        "device": st.just("cpu"),
        "name": st.text(st.characters(exclude_characters="\x00"), max_size=10),
        "grid": st.sampled_from(
            [
                *("r=4,8", "targets=Q,V|All linear", "alpha=2r,16", "init=default,pissa", "lr=1e-3,2e-4"),
                *("dropout=0,0.1", "loraplus=off,16", "rslora=true,false", "targets=q_proj+v_proj|re:.*proj"),
            ]
        ),
        "ray": st.just("127.0.0.1:1"),
        "seeds": st.integers(1, 3).map(str),
        "examples": st.integers(1, 10**7).map(str),
        "completion_tokens": st.integers(1, 4000).map(str),
        "seq_len": st.integers(1, 2048).map(str),
        "compare": st.just(str(tmp / FUZZ_ADAPTER)),
        "right_size": st.floats(0.01, 0.9999).map(repr),
    }
    return by_dest.get(action.dest, st.text(st.characters(exclude_characters="\x00"), max_size=10))


def _value_for(action, tmp: Path):
    """Mostly valid, so argv with a handful of flags is often all valid and reaches the engine."""
    return mostly(_valid_value_for(action, tmp), _hostile_value_for(action, tmp), hostile_percent=12)


_counter = iter(range(10**9))


def _fresh_dir(tmp: Path, name: str | None = None) -> Path:
    path = tmp / f"case-{next(_counter)}"
    path.mkdir()
    if name:
        path = path / name
        path.mkdir()
    return path


def model_files(tmp: Path):
    """--model as a config.json on disk: a mutated catalogue config, maybe in a folder whose name
    is not valid UTF-8."""

    def write(pair, name):
        folder = _fresh_dir(tmp, name)
        (folder / "config.json").write_text(as_json(pair[1]))
        return str(folder)

    names = st.one_of(
        st.none(), st.sampled_from(["my model", "\udcff\udcfe", "é", "-x", "--json", "a:b"]), st.text(max_size=4)
    )
    safe_names = names.filter(lambda n: n is None or (n and "/" not in n and "\x00" not in n and n not in (".", "..")))
    return st.builds(write, model_configs(), safe_names)


def valid_lora_files(tmp: Path):
    """--lora as a valid adapter_config.json (as `export` writes it)."""

    def write(settings: LoraSettings) -> str:
        path = _fresh_dir(tmp) / "adapter_config.json"
        path.write_text(settings.to_json())
        return str(path)

    return st.builds(
        lambda r, targets, dropout: write(
            LoraSettings(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=dropout)
        ),
        st.integers(1, 64),
        st.sampled_from(["all-linear", ".*proj", ("q_proj", "v_proj", "c_attn")]),
        st.sampled_from([0.0, 0.1]),
    )


def lora_files(tmp: Path):
    """--lora as a file: a generated adapter_config.json, garbage, a folder, a missing path, 2 MB."""

    def write(payload):
        path = _fresh_dir(tmp) / "adapter_config.json"
        path.write_bytes(payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass"))
        return str(path)

    return st.one_of(
        adapter_payloads.map(write),
        st.builds(lambda: str(_fresh_dir(tmp))),  # an empty folder
        st.just("/no/such/adapter_config.json"),
        st.just("/dev/zero"),
        st.just("/"),
        st.builds(lambda: write(b'{"r": 8, "x": "' + b"a" * 2_000_000 + b'"}')),
    )


@st.composite
def cli_argv(draw, command: str, tmp: Path):
    """argv for `command`: a random subset of its flags with generated values (required flags
    mostly present), as `--flag value` or `--flag=value`, in any order, sometimes a stray token."""
    parser = _subparsers()[command]
    groups: list[list[str]] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "out"):
            continue
        flag = max(action.option_strings, key=len)
        if draw(st.integers(0, 99)) < (20 if action.required else 70):  # absent shrinks best
            continue
        if action.nargs == 0:  # store_true
            groups.append([flag])
            continue
        for _ in range(draw(st.integers(1, 2)) if isinstance(action.default, list) else 1):
            value = draw(_value_for(action, tmp))
            use_equals = value.startswith("-") or draw(st.integers(0, 99)) >= 80
            groups.append([f"{flag}={value}"] if use_equals else [flag, value])
    order = draw(st.permutations(range(len(groups)))) if groups else []
    argv = [command] + [token for i in order for token in groups[i]]
    if draw(st.integers(0, 99)) >= 94:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--nope", "-x", "--", "stray", "="])))
    return argv


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` in-process, with stdout and stderr as a real terminal has them (UTF-8 stdout
    that refuses unencodable text, stderr that escapes it)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="\n")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="\n")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    out.flush()
    err.flush()
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def _not_json(constant: str):
    raise AssertionError(f"--json printed {constant}, which is not JSON")


def assert_cli_contract(argv, code, out, err, allowed=(0, 2)) -> None:
    assert "Traceback" not in err, f"{argv!r} printed a traceback:\n{err}"
    assert code in allowed, f"{argv!r} exited {code!r}; stderr: {err!r}"
    lines = err.splitlines()
    if code == 2:
        errors = [line for line in lines if line.startswith("error:")]
        others = [line for line in lines if not line.startswith(("error:", "warning:"))]
        assert len(errors) == 1 and not others, f"{argv!r}: stderr is not one error line: {err!r}"
        assert lines[-1].startswith("error:") and len(lines[-1]) > len("error: "), err
    if code == 0 and "--json" in argv:
        assert_no_negative_counts(json.loads(out, parse_constant=_not_json))
    if code == 0:
        for line in out.splitlines():
            if line.startswith(("trainable params", "all params", "base params", "trainable ")):
                assert "-" not in line.split()[-1], f"negative count in {line!r}"


def _cli_test(command: str, examples: int):
    @fuzz(examples)
    @given(data=st.data())
    def test(_sandbox, data) -> None:
        argv = data.draw(cli_argv(command, _sandbox.root), label="argv")
        with hang_guard(f"main({show(argv)})"):
            code, out, err = run_cli(argv)
        event(f"exit {code}")
        assert_cli_contract(argv, code, out, err)

    test.__name__ = test.__qualname__ = f"test_cli_{command}_exits_0_or_2_with_one_line"
    test.__doc__ = f"`{command}` with generated flags: exit 0, or 2 with one `error:` line; never raises."
    return test


# Examples per subcommand, by cost: `catalogue` builds all 20 models, `search` counts up to 135 configs.
test_cli_count_exits_0_or_2_with_one_line = _cli_test("count", 250)
test_cli_catalogue_exits_0_or_2_with_one_line = _cli_test("catalogue", 3)
test_cli_strategies_exits_0_or_2_with_one_line = _cli_test("strategies", 60)
test_cli_export_exits_0_or_2_with_one_line = _cli_test("export", 150)
test_cli_memory_exits_0_or_2_with_one_line = _cli_test("memory", 150)
test_cli_search_exits_0_or_2_with_one_line = _cli_test("search", 25)
test_cli_advise_exits_0_or_2_with_one_line = _cli_test("advise", 40)

FUZZ_ADAPTER = "fuzz-adapter"  # a tiny trained-shape adapter in the sandbox, for `inspect`


def _fuzz_adapter(root: Path) -> Path:
    folder = root / FUZZ_ADAPTER
    if not (folder / "adapter_model.safetensors").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
        model = get_peft_model(
            LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
        model.save_pretrained(folder)
    return folder


@fuzz(40)
@given(data=st.data())
def test_cli_inspect_exits_0_or_2_with_one_line(_sandbox, data) -> None:
    """`inspect` on a real adapter or hostile sources, with generated flags (never --out: the
    fuzz writes nothing): exit 0, or 2 with one `error:` line."""
    adapter = str(_fuzz_adapter(_sandbox.root))
    hostile = st.sampled_from(["run:abc", "run:-1", "run:99999", "/dev/zero", "/", "nobody/adapter", "", "~nobody/x"])
    source = data.draw(mostly(st.just(adapter), st.one_of(hostile, _argv_text()), hostile_percent=30), label="source")
    flags = data.draw(cli_argv("inspect", _sandbox.root), label="flags")[1:]
    argv = ["inspect", source, *flags] if not source.startswith("-") else ["inspect", *flags, "--", source]
    with hang_guard(f"main({show(argv)})"):
        code, out, err = run_cli(argv)
    event(f"exit {code}")
    assert_cli_contract(argv, code, out, err)


# Each makes `train` bad input, to be refused before a run exists.
TRAIN_INVALID = [
    ["--steps", "0"],
    ["--steps=-1"],
    ["--lr", "0"],
    ["--lr", "nan"],
    ["--lr", "5"],
    ["--batch-size", "0"],
    ["--seq-len", "5000"],
    ["--seq-len", str(10**30)],
    ["--eval-every", "0"],
    ["--device", "banana"],
    ["--device", "cuda:abc"],
    ["--device", "tpu"],
    ["--dataset", "upload:/no/such/data.jsonl"],
    ["--dataset", "no_such_task"],
    ["--dataset", "upload:/"],
    ["--targets", "re:["],
    ["--targets", "re:(?P<"],
    ["--targets", "re:*a"],
    ["--r", "0"],
    ["--r", str(10**30)],
    ["--dropout", "1.5"],
    ["--alpha", "nan"],
    ["--alpha", "0"],
    ["--lora", "/no/such/adapter_config.json"],
    ["--layers", "a-b"],
    ["--rank-pattern", "fc1"],
]


@fuzz(150)
@given(data=st.data(), invalid=st.sampled_from(TRAIN_INVALID))
def test_cli_train_with_bad_input_exits_2_before_a_run_exists(_sandbox, data, invalid) -> None:
    _refused_before_anything(_sandbox, data, "train", invalid)


def _refused_before_anything(sandbox, data, command: str, invalid: list[str]) -> None:
    """`command` with generated flags plus one `invalid` item: exit 2 with one line, nothing
    trained, and no run or experiment in its store."""
    out_dir = _fresh_dir(sandbox.root)
    argv = data.draw(cli_argv(command, sandbox.root), label="argv")
    argv += [*invalid, "--out", str(out_dir)]
    with hang_guard(f"main({show(argv)})"):
        code, out, err = run_cli(argv)
    assert not sandbox.reached, f"{argv!r} reached training"
    assert_cli_contract(argv, code, out, err, allowed=(2,))
    if (out_dir / "runs.sqlite").exists():
        from lora_core.store import Store

        assert Store(out_dir).experiments().empty and Store(out_dir).runs().empty, f"{argv!r} created a record"


# Each makes `sweep` bad input, to be refused before an experiment exists.
SWEEP_INVALID = [
    ["--grid", "r=0"],
    ["--grid", "r=4,,8"],
    ["--grid", "x=1"],
    ["--grid", "targets=re:["],
    ["--grid", "targets=../../etc"],
    ["--grid", "alpha=-1"],
    ["--grid", "lr=5"],
    ["--grid", "dropout=1"],
    ["--grid", "init=eva"],
    ["--grid", "loraplus=0.5"],
    ["--grid", "r=" + ",".join(map(str, range(1, 600)))],
    ["--seeds", "0"],
    ["--seeds", "11"],
    ["--lr", "nan"],
    ["--batch-size", "0"],
    ["--dataset", "no_such_task"],
    ["--dataset", "upload:/"],
    ["--targets", "re:["],
    ["--r", "0"],
]


@fuzz(100)
@given(data=st.data(), invalid=st.sampled_from(SWEEP_INVALID))
def test_cli_sweep_with_bad_input_exits_2_before_an_experiment_exists(_sandbox, data, invalid) -> None:
    _refused_before_anything(_sandbox, data, "sweep", invalid)


@pytest.mark.parametrize("cut", [0, 100])
def test_cli_into_a_closed_pipe_prints_no_traceback(cut) -> None:
    """`python -m lora_core count ... | head -c N`: the reader goes away before (0) or in the middle
    of (100: the 160 kB JSON outgrows the 64 kB pipe buffer) the output."""
    model = "meta-llama/Llama-2-70b-hf"
    command = [sys.executable, "-m", "lora_core", "count", "--model", model, "--targets", "all-linear", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env) as process:
        process.stdout.read(cut)
        process.stdout.close()
        err = process.stderr.read().decode()
        process.wait(timeout=120)
    assert "Traceback" not in err, err


# --- minimal reproducers of what the fuzzing found (each its own test id; same checks as above) -------


def _config_text(model: str, **changes) -> str:
    return json.dumps({**CATALOGUE_CONFIGS[model], **changes})


OPT = "facebook/opt-125m"
ENGINE_CASES = {
    "settings-task-type-empty": (test_lora_settings_give_a_count_or_one_line_error, {"fields": {"task_type": ""}}),
    "settings-dora-with-lora-bias": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"use_dora": True, "lora_bias": True}},
    ),
    "settings-modules-to-save-bad-regex": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"modules_to_save": ["("]}},
    ),
    "settings-redos-target": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"target_modules": "(.*)*z"}},
    ),
    "settings-redos-rank-pattern-key": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"target_modules": ["q_proj"], "rank_pattern": {"(.*)*z": 4}}},
    ),
    "settings-redos-alternation": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"target_modules": "(.|.)*z"}},
    ),
    "settings-unknown-extra": (test_lora_settings_give_a_count_or_one_line_error, {"fields": {"peft_extras": {"": 1}}}),
    "settings-layers-pattern-alone": (
        test_lora_settings_give_a_count_or_one_line_error,
        {"fields": {"layers_pattern": "layers"}},
    ),
    "settings-deep-value": (test_lora_settings_give_a_count_or_one_line_error, {"fields": {"task_type": Deep(5000)}}),
    "import-task-type-lowercase": (
        test_import_config_gives_settings_or_one_line_error,
        {"payload": '{"task_type": "causal_lm"}'},
    ),
    "import-loftq": (
        test_import_config_gives_settings_or_one_line_error,
        {"payload": '{"init_lora_weights": "loftq"}'},
    ),
    "import-nan-extra": (
        test_import_config_gives_settings_or_one_line_error,
        {"payload": '{"target_modules": ["q_proj"], "use_qalora": NaN}'},
    ),
    "config-model-type-list": (
        test_model_config_loader_gives_a_model_or_one_line_error,
        {"payload": '{"model_type": [64]}'},
    ),
    "config-architectures-bool": (
        test_model_config_loader_gives_a_model_or_one_line_error,
        {"payload": _config_text("openai-community/gpt2", architectures=True)},
    ),
    "config-architectures-int-list": (
        test_model_config_loader_gives_a_model_or_one_line_error,
        {"payload": _config_text("openai-community/gpt2", architectures=[5])},
    ),
}


def _short_hang_limit() -> None:
    """A reproducer is one small case (well under a second when it works): 5 s, not HANG_S."""
    _HUNG.add(os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0])


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_found_by_fuzzing_engine(case) -> None:
    _short_hang_limit()
    test, kwargs = ENGINE_CASES[case]
    defaults = {"model": OPT} if "model" in test.hypothesis.inner_test.__code__.co_varnames else {}
    if test is test_model_config_loader_gives_a_model_or_one_line_error:
        defaults = {"lora": LoraSettings()}
    test.hypothesis.inner_test(**{**defaults, **kwargs})


CLI_CASES = {
    "export-dora-with-lora-bias": ["export", "--model", OPT, "--use-dora", "--lora-bias"],
    "count-json-dora-with-lora-bias": ["count", "--model", OPT, "--use-dora", "--lora-bias", "--json"],
    "count-modules-to-save-bad-regex": ["count", "--model", OPT, "--modules-to-save", "("],
    "count-lora-file-task-type": ["count", "--model", OPT, "--lora", "{tmp}/task_type.json"],
    "count-json-lora-file-nan-extra": ["count", "--model", OPT, "--lora", "{tmp}/nan.json", "--json"],
    "count-redos-target": ["count", "--model", OPT, "--targets", "re:(.*)*z"],
    "count-redos-alternation": ["count", "--model", OPT, "--targets", "re:(.|.)*z"],
    "count-non-utf8-model-folder": ["count", "--model", "{tmp}/\udcff"],
    "search-non-utf8-model-folder": ["search", "--model", "{tmp}/\udcff"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_found_by_fuzzing_cli(case, tmp_path) -> None:
    _short_hang_limit()
    (tmp_path / "task_type.json").write_text('{"task_type": "causal_lm", "r": 8}')
    (tmp_path / "nan.json").write_text('{"r": 8, "target_modules": ["q_proj"], "use_qalora": NaN}')
    folder = tmp_path / "\udcff"  # a folder whose name is the byte 0xff (not UTF-8)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CATALOGUE_CONFIGS[OPT]))
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in CLI_CASES[case]]
    with hang_guard(f"main({show(argv)})"):
        code, out, err = run_cli(argv)
    assert_cli_contract(argv, code, out, err)
