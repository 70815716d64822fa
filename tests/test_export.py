"""Exports load in the tools they are for and give back the same counts."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from peft_reference import peft_counts

from lora_core import LoraSettings, LoraSettingsError, catalogue_ids, count_lora_params
from lora_core.export import FORMATS, export, import_config
from lora_core.models import inventory, resolve_model
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
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
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
