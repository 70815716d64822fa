"""LoraSettings: PEFT field names, validation PEFT lacks, and the adapter_config.json round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from peft_reference import peft_counts

from lora_core import LoraSettings, LoraSettingsError, count_lora_params, unknown_keys
from lora_core.settings import MAX_RANK, lora_scale


def test_field_names_and_defaults_are_peft_s() -> None:
    peft_default = LoraConfig()
    ours = LoraSettings()
    for name in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "lora_bias"):
        assert getattr(ours, name) == getattr(peft_default, name), name


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"r": 0}, "`r`"),
        ({"lora_alpha": 0}, "`lora_alpha`"),
        ({"lora_dropout": 1.0}, "`lora_dropout`"),
        ({"lora_dropout": -0.1}, "`lora_dropout`"),
        ({"bias": "some"}, "`bias` must be one of none, all, lora_only"),
        ({"rank_pattern": {"fc1": 0}}, "`rank_pattern['fc1']` must be a positive integer up to 65,536, got 0"),
        ({"rank_pattern": {"fc1": True}}, "`rank_pattern['fc1']` must be a positive integer"),
        ({"alpha_pattern": {"fc1": -2}}, "`alpha_pattern['fc1']` must be > 0"),
        ({"target_modules": ()}, "`target_modules`"),
        ({"target_modules": "all-linear", "layers_to_transform": (0,)}, "`layers_to_transform`"),
        ({"layers_pattern": "layers"}, "`layers_pattern`"),
        ({"target_parameters": ("down_proj",), "use_dora": True}, "`use_dora`"),
    ],
)
def test_each_structural_problem_names_its_field(changes, field) -> None:
    problems = LoraSettings(target_modules=("q_proj",)).replace(**changes).problems()
    assert len(problems) == 1
    assert field in problems[0]


def test_valid_settings_have_no_problems() -> None:
    assert LoraSettings(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=("q_proj",)).problems() == []


@pytest.mark.parametrize(
    "settings",
    [
        LoraSettings(r=16, lora_alpha=32, target_modules=("v_proj", "q_proj"), lora_dropout=0.05),
        LoraSettings(r=8, target_modules="all-linear", use_rslora=True, use_dora=True),
        LoraSettings(
            r=8,
            lora_alpha=16,
            target_modules=("q_proj", "v_proj", "fc1", "fc2"),
            rank_pattern={"fc1": 32},
            alpha_pattern={"fc1": 32},
            layers_to_transform=(0, 2, 4),
            bias="lora_only",
            modules_to_save=("lm_head",),
            exclude_modules=("fc2",),
        ),
    ],
)
def test_json_round_trip_through_peft_save_and_load(settings: LoraSettings, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(settings.to_json())
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    back = LoraSettings.from_peft_config(loaded)
    assert back == settings
    assert LoraSettings.from_json(settings.to_json()) == settings
    ours = count_lora_params("facebook/opt-125m", settings)
    assert ours.trainable_params == peft_counts("facebook/opt-125m", back)[0]


def test_export_is_stable_and_sorted() -> None:
    a = LoraSettings(target_modules=("v_proj", "q_proj")).to_json()
    b = LoraSettings(target_modules=("q_proj", "v_proj")).to_json()
    assert a == b
    data = json.loads(a)
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert list(data) == sorted(data)
    assert data["peft_type"] == "LORA"


def test_peft_s_own_saved_file_imports(tmp_path) -> None:
    LoraConfig(r=12, lora_alpha=24, target_modules=["q_proj", "k_proj"], init_lora_weights="gaussian").save_pretrained(
        str(tmp_path)
    )
    settings = LoraSettings.from_json((tmp_path / "adapter_config.json").read_text())
    assert settings.r == 12 and settings.lora_alpha == 24
    assert set(settings.target_modules) == {"q_proj", "k_proj"}
    # A LoraConfig field this object does not model is carried, not lost.
    assert settings.peft_extras["init_lora_weights"] == "gaussian"
    assert settings.to_peft_config().init_lora_weights == "gaussian"


def test_minimal_hand_written_file_and_unknown_keys() -> None:
    data = {"r": 4, "target_modules": ["q_proj"], "my_note": "hi", "peft_type": "LORA"}
    settings = LoraSettings.from_peft_dict(data)
    assert settings.r == 4 and settings.target_modules == ("q_proj",)
    assert unknown_keys(data) == ["my_note"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"peft_type": "IA3"}', "only LORA"),
        ('{"rank_pattern": [1]}', "`rank_pattern`"),
        ('{"use_dora": "yes"}', "`use_dora`"),
        ('{"target_modules": 5}', "`target_modules`"),
    ],
)
def test_bad_adapter_files_raise_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(LoraSettingsError, match=message):
        LoraSettings.from_json(text)


def test_to_peft_config_is_fresh_each_time() -> None:
    settings = LoraSettings(target_modules=("q_proj",))
    first = settings.to_peft_config()
    first.target_modules.add("k_proj")
    assert settings.to_peft_config().target_modules == {"q_proj"}


def test_scaling_follows_lora_and_rslora() -> None:
    assert LoraSettings(r=16, lora_alpha=32).scaling() == 2.0
    assert LoraSettings(r=16, lora_alpha=32, use_rslora=True).scaling() == 8.0


def peft_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The `scaling` PEFT's own `LoraLayer.update_layer` gives a LoRA Linear of rank `r`."""
    config = LoraConfig(use_rslora=use_rslora, init_lora_weights=False)
    with torch.device("meta"):
        layer = LoraLinear(torch.nn.Linear(1, 1), "default", config=config, r=r, lora_alpha=lora_alpha)
    return layer.scaling["default"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scale_is_peft_s_to_the_last_bit(use_rslora) -> None:
    """Scalars, numpy arrays (counting's per-module column) and torch tensors (the alpha
    simulation) all give PEFT's float. The ranks include every one up to MAX_RANK where Python's
    `r ** 0.5` rounds differently from the `math.sqrt(r)` PEFT divides by (5579 is one)."""
    pow_rounds_differently = [r for r in range(1, MAX_RANK + 1) if r**0.5 != math.sqrt(r)]
    ranks = [*range(1, 65), *pow_rounds_differently, MAX_RANK]
    alphas = (1, 3, 7.5, 0.1)
    expected = np.array([[peft_scaling(r, alpha, use_rslora) for alpha in alphas] for r in ranks])
    scalars = np.array([[lora_scale(r, alpha, use_rslora) for alpha in alphas] for r in ranks])
    arrays = lora_scale(np.array(ranks)[:, None], np.array(alphas, dtype=float)[None, :], use_rslora)
    tensors = np.array([lora_scale(r, torch.tensor(alphas, dtype=torch.float64), use_rslora).numpy() for r in ranks])
    mismatches = {
        form: int((values != expected).sum())
        for form, values in (("scalars", scalars), ("arrays", arrays), ("tensors", tensors))
    }
    print(f"{expected.size} (r, alpha) pairs against PEFT, mismatches per form: {mismatches}")
    assert mismatches == {"scalars": 0, "arrays": 0, "tensors": 0}


def test_settings_hash_and_equality_ignore_list_vs_tuple() -> None:
    a = LoraSettings(target_modules=["q_proj"], rank_pattern={"q_proj": 4})
    b = LoraSettings(target_modules=("q_proj",), rank_pattern={"q_proj": 4})
    assert a == b and hash(a) == hash(b)


# --- hostile values: one message naming the field, never a traceback ------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": "["}, "`target_modules`"),
        ({"exclude_modules": "(a"}, "`exclude_modules`"),
        ({"rank_pattern": {"[": 4}}, "`rank_pattern key`"),
        ({"alpha_pattern": {"*x": 4}}, "`alpha_pattern key`"),
        ({"layers_pattern": "(", "layers_to_transform": (0,)}, "`layers_pattern`"),
        ({"r": 1 << 20}, "`r`"),
        ({"layers_to_transform": (0, 99_999_999)}, "`layers_to_transform`"),
        ({"rank_pattern": {"(?i)q_proj": 4}}, "`rank_pattern key`"),  # compiles alone, not inside PEFT's pattern
        ({"layers_pattern": "(?i)layers", "layers_to_transform": (0,)}, "`layers_pattern`"),
        ({"target_modules": "(.+)+y"}, "repeats a repeat"),  # exponential backtracking in re
        ({"target_modules": r"(\w+\s?)+"}, "repeats a repeat"),
        ({"target_modules": "a" * 1001}, "at most 1,000"),
        ({"use_dora": True, "lora_bias": True}, "LoraConfig refuses"),  # was a ValueError from PEFT
    ],
)
def test_bad_regexes_and_absurd_sizes_are_problems_not_tracebacks(changes, field) -> None:
    problems = LoraSettings(target_modules=("q_proj",)).replace(**changes).problems()
    assert len(problems) == 1 and field in problems[0], problems


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"modules_to_save": 5}, "`modules_to_save`"),
        ({"r": "8"}, "`r`"),
        ({"lora_alpha": "16"}, "`lora_alpha`"),
        ({"lora_dropout": [0.1]}, "`lora_dropout`"),
        ({"lora_alpha": float("nan")}, "`lora_alpha`"),
        ({"target_modules": [["q_proj"]]}, "`target_modules`"),
        ({"layers_to_transform": "0-3"}, "`layers_to_transform`"),
        ({"target_parameters": {"a": 1}}, "`target_parameters`"),
        ({"rank_pattern": {"": 4}}, "`rank_pattern`"),
    ],
)
def test_wrong_types_in_an_adapter_config_name_the_field(data, field) -> None:
    """Each of these raised a TypeError (or a message without the field) before."""
    with pytest.raises(LoraSettingsError) as error:
        LoraSettings.from_peft_dict({"target_modules": ["q_proj"], **data})
    assert field in str(error.value) and "\n" not in str(error.value)


def test_constructing_with_a_wrong_type_is_refused_at_once() -> None:
    with pytest.raises(LoraSettingsError, match="`target_modules`"):
        LoraSettings(target_modules=[["unhashable"]])


@pytest.mark.parametrize("value", [b"", frozenset({"a"}), float("nan"), object()])
def test_extras_json_cannot_hold_are_refused_at_once(value) -> None:
    """PEFT's LoraConfig takes these, but an export could not write them (nor a cache key hash them)."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for extras in ({"init_lora_weights": value}, {"inference_mode": deep}):
        with pytest.raises(LoraSettingsError, match="`peft_extras` must hold JSON values"):
            LoraSettings(target_modules=("q_proj",), peft_extras=extras)


def test_binary_and_deeply_nested_json_are_refused_in_one_line() -> None:
    with pytest.raises(LoraSettingsError, match="not a text file"):
        LoraSettings.from_json(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    with pytest.raises(LoraSettingsError, match="nested too deeply"):
        LoraSettings.from_json("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(
    "pattern", [r".*\.(q|k|v)_proj", r"(.*\.)?q_proj", r"(\w+\.)*q_proj", r"model\.layers\.(\d+)\.mlp\..*"]
)
def test_ordinary_module_regexes_pass(pattern) -> None:
    assert LoraSettings(target_modules=pattern).problems() == []
