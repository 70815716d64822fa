"""Exports load in the tools they are for and give back the same counts."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from peft import LoraConfig
from peft_reference import peft_counts

from lora_core import LoraSettings, LoraSettingsError, catalogue_ids, count_lora_params
from lora_core.export import FORMATS, _yaml, axolotl_config, export, import_config, llamafactory_config
from lora_core.models import CATALOGUE_DIR, inventory, resolve_model, spec_from_text
from lora_core.strategies import resolve_strategy

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_id", catalogue_ids())
def test_peft_export_loads_and_counts_the_same_on_every_catalogue_model(model_id: str, tmp_path) -> None:
    inv = inventory(resolve_model(model_id))
    settings = resolve_strategy(inv, "All attention").apply(LoraSettings(r=8, lora_alpha=16, lora_dropout=0.05))
    (tmp_path / "adapter_config.json").write_text(export(settings, inv, "peft"))
    loaded = LoraConfig.from_pretrained(str(tmp_path))
    assert loaded.base_model_name_or_path == model_id
    back = LoraSettings.from_peft_config(loaded)
    shown = count_lora_params(inv, settings).trainable_params
    assert count_lora_params(inv, back).trainable_params == shown
    assert peft_counts(model_id, back)[0] == shown


def test_peft_export_is_stable() -> None:
    a = LoraSettings(r=8, target_modules=("v_proj", "q_proj"))
    b = LoraSettings(r=8, target_modules=["q_proj", "v_proj"])
    assert export(a, "facebook/opt-125m", "peft") == export(b, "facebook/opt-125m", "peft")


def test_full_json_round_trips_through_import() -> None:
    settings = LoraSettings(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj"), use_rslora=True)
    text = export(settings, "meta-llama/Llama-2-7b-hf", "json")
    data = json.loads(text)
    assert data["trainable_params"] == 8_388_608 and data["effective_scale"] == 8.0
    back, unknown, model = import_config(text)
    assert back == settings and unknown == [] and model == "meta-llama/Llama-2-7b-hf"


def test_import_reports_unknown_keys_and_rejects_bad_values() -> None:
    settings, unknown, _ = import_config('{"r": 4, "target_modules": ["q_proj"], "favourite_colour": "blue"}')
    assert settings.r == 4 and unknown == ["favourite_colour"]
    with pytest.raises(LoraSettingsError, match="`r` must be a positive integer"):
        import_config('{"r": 0, "target_modules": ["q_proj"]}')
    with pytest.raises(LoraSettingsError, match="not valid JSON"):
        import_config("{nope")


def test_python_snippet_runs_as_is_and_prints_the_count(tmp_path, capsys) -> None:
    settings = LoraSettings(r=16, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    script = tmp_path / "snippet.py"
    script.write_text(export(settings, "facebook/opt-125m", "python"))
    runpy.run_path(str(script))
    assert "trainable params: 589,824" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("axolotl", ["adapter: lora", "lora_r: 16", "lora_alpha: 32", "lora_target_modules:", "  - q_proj"]),
        ("llamafactory", ["finetuning_type: lora", "lora_rank: 16", "lora_target: q_proj,v_proj"]),
    ],
)
def test_yaml_fragments(fmt: str, expected: list[str]) -> None:
    text = export(
        LoraSettings(r=16, lora_alpha=32, target_modules=("q_proj", "v_proj")), "meta-llama/Llama-2-7b-hf", fmt
    )
    for line in expected:
        assert line in text.splitlines()


def test_yaml_for_all_linear_and_regex() -> None:
    all_linear = LoraSettings(r=8, target_modules="all-linear")
    assert "lora_target_linear: true" in export(all_linear, "facebook/opt-125m", "axolotl")
    assert "lora_target: all" in export(all_linear, "facebook/opt-125m", "llamafactory")
    regex = LoraSettings(r=8, target_modules=r".*\.(q_proj|v_proj)")
    assert "lora_target: q_proj,v_proj" in export(regex, "facebook/opt-125m", "llamafactory")


def _loaded(settings: LoraSettings, model, fmt: str) -> dict:
    return yaml.safe_load(export(settings, model, fmt))


def test_yaml_exports_load_back_as_the_intended_mapping() -> None:
    settings = LoraSettings(
        r=16,
        lora_alpha=8.5,
        lora_dropout=0.05,
        target_modules=("q_proj", "v_proj"),
        use_rslora=True,
        use_dora=True,
        modules_to_save=("lm_head",),
        layers_to_transform=(0, 3),
    )
    assert _loaded(settings, "meta-llama/Llama-2-7b-hf", "axolotl") == {
        "base_model": "meta-llama/Llama-2-7b-hf",
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 8.5,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "peft_use_rslora": True,
        "peft_use_dora": True,
        "lora_modules_to_save": ["lm_head"],
        "peft_layers_to_transform": [0, 3],
    }
    assert _loaded(settings, "meta-llama/Llama-2-7b-hf", "llamafactory") == {
        "model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 8.5,
        "lora_dropout": 0.05,
        "lora_target": "q_proj,v_proj",
        "use_rslora": True,
        "use_dora": True,
        "additional_target": "lm_head",
    }


@pytest.mark.parametrize(
    "name", ["yes", "null", "1e3", "0x1F", "~", "a: b", "q_proj # c", "- item", "[x]", "{y}", "'quoted'", "ü-名"]
)
def test_yaml_exports_quote_awkward_names(name: str) -> None:
    """Names that YAML would read as booleans, nulls, numbers, mappings, comments or flow lists
    come back as the same strings: the f-string YAML this replaced wrote `base_model: yes`, which
    Axolotl reads as True."""
    settings = LoraSettings(r=8, target_modules=("q_proj",), modules_to_save=(name,))
    targets = [name, "v_proj"]
    for build, fmt in ((axolotl_config, "axolotl"), (llamafactory_config, "llamafactory")):
        config = build(settings, name, targets)
        assert yaml.safe_load(_yaml(config)) == config
        assert len(_yaml(config).splitlines()) == len(config) + (len(targets) + 1 if fmt == "axolotl" else 0)
    model = inventory(spec_from_text((CATALOGUE_DIR / "facebook__opt-125m.json").read_text(), name, "local"))
    loaded = _loaded(LoraSettings(r=8, target_modules=("q_proj",)), model, "axolotl")
    assert loaded["base_model"] == name and loaded["lora_target_modules"] == ["q_proj"]


def test_yaml_exports_of_a_regex_list_the_matched_names() -> None:
    regex = LoraSettings(r=8, target_modules=r".*\.(q_proj|v_proj|fc\d)$")
    assert _loaded(regex, "facebook/opt-125m", "axolotl")["lora_target_modules"] == ["fc1", "fc2", "q_proj", "v_proj"]
    assert _loaded(regex, "facebook/opt-125m", "llamafactory")["lora_target"] == "fc1,fc2,q_proj,v_proj"


def test_export_refuses_settings_the_model_does_not_accept() -> None:
    with pytest.raises(LoraSettingsError, match="matches no module"):
        export(LoraSettings(target_modules=("nothing",)), "facebook/opt-125m", "peft")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_export(fmt: str) -> None:
    command = [
        sys.executable,
        "-m",
        "lora_core",
        "export",
        "--model",
        "facebook/opt-125m",
        "--r",
        "8",
        "--targets",
        "q_proj,v_proj",
        "--format",
        fmt,
    ]
    proc = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    if fmt in ("peft", "json"):
        json.loads(proc.stdout)


def test_import_of_an_extra_field_peft_refuses_is_one_line() -> None:
    """`eva_config: []` raised a TypeError from inside LoraConfig."""
    with pytest.raises(LoraSettingsError, match=r"LoraConfig refuses these settings \(TypeError: .`EvaConfig`"):
        import_config('{"r": 8, "target_modules": ["q_proj"], "eva_config": []}')
    settings, _, _ = import_config('{"r": 8, "target_modules": ["q_proj"], "init_lora_weights": "pissa"}')
    assert settings.peft_extras == {"init_lora_weights": "pissa"}
