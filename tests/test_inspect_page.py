"""AppTest of the Inspect page: an adapter with planted ranks shows them in the heatmap and in the
rank-used tables by module type and by depth, the right-size and compare panels answer their
widgets, bad input is one line that keeps what was shown, and an adapter the app trained on the
embedded model is inspected end to end (page + CLI)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from streamlit.testing.v1 import AppTest
from test_inspect import assert_usage_table, expected_usage, lora_layers, planted_usage_model, run_inspect
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
RANKS = {0: 2, 1: 5}  # planted rank of every update, by layer (r = 8)


def open_page() -> AppTest:
    """The page through app.py, as the server runs it."""
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.run()
    at.switch_page("pages/inspect.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Inspect"
    return at


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """q_proj and v_proj of a 2-layer Llama, r=8, each update with RANKS[layer] equal singular values."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            k = RANKS[int(name.split(".")[2])]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            u = torch.linalg.qr(torch.randn(b.shape[0], k, generator=generator)).Q
            v = torch.linalg.qr(torch.randn(a.shape[1], k, generator=generator)).Q
            x = torch.randn(k, 8, generator=generator)
            b.copy_(u @ x)
            a.copy_(torch.linalg.pinv(x) @ v.T)
    folder = tmp_path_factory.mktemp("page") / "planted"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def page(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("LORA_EXPLORER_MODEL_ROOTS", raising=False)
    return open_page()


def load_folder(at: AppTest, path: object, prefix: str = "lx_inspect", button: str = "lx_inspect_go") -> None:
    at.radio(key=f"{prefix}_source").set_value("Folder or zip on the server").run()
    at.text_input(key=f"{prefix}_text").set_value(str(path))
    at.button(key=button).click().run()
    assert not at.exception, at.exception


def chart(at: AppTest, key: str) -> dict:
    element = next(c for c in at.get("plotly_chart") if c.proto.id.endswith(key) or key in c.proto.id)
    return json.loads(element.proto.spec)


def array(field) -> np.ndarray:
    """A trace array from figure JSON: plotly writes numpy data as base64 typed arrays."""
    if isinstance(field, dict) and "bdata" in field:
        values = np.frombuffer(base64.b64decode(field["bdata"]), dtype=np.dtype(field["dtype"]))
        shape = field.get("shape")  # "2, 2" for a 2-d array
        return values.reshape([int(n) for n in str(shape).split(",")]) if shape else values
    return np.array(field, dtype=float)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_heatmap_shows_the_planted_ranks_and_follows_its_colour(page: AppTest, planted: Path) -> None:
    load_folder(page, planted)
    assert not page.error
    heat = chart(page, "lx_inspect_heatmap")["data"][0]
    assert heat["x"] == ["q_proj", "v_proj"] and heat["y"] == ["0", "1"]
    expected = np.array([[RANKS[0] / 8] * 2, [RANKS[1] / 8] * 2])  # 90% of k equal values needs all k
    np.testing.assert_allclose(array(heat["z"]), expected)
    page.selectbox(key="lx_inspect_heat_value").set_value("entropy_rank").run()
    heat = chart(page, "lx_inspect_heatmap")["data"][0]
    np.testing.assert_allclose(array(heat["z"]), [[2, 2], [5, 5]], atol=1e-4)
    assert metric(page, "Configured rank (sum of r)") == "32"
    assert metric(page, "Rank used for 90% of the energy") == f"{(2 * 2 + 2 * 5) / 32:.0%}"


@pytest.fixture(scope="module")
def planted_usage(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The adapter of test_inspect's summary tests: planted ranks differing by module type and by layer."""
    model = planted_usage_model()
    folder = tmp_path_factory.mktemp("page") / "usage"
    model.save_pretrained(folder)
    return model, folder


def usage_table(at: AppTest, by: str) -> pd.DataFrame:
    """The one table shown whose first column is `by` ("type" or "layer"): st.dataframe's key does
    not reach AppTest unless the table takes selections."""
    (found,) = [d.value for d in at.dataframe if list(d.value.columns[:1]) == [by]]
    return found


def test_the_rank_used_tables_show_the_planted_figures_by_type_and_by_depth(
    page: AppTest, planted_usage: tuple[torch.nn.Module, Path], planted: Path
) -> None:
    model, folder = planted_usage
    load_folder(page, folder)
    assert not page.error
    assert_usage_table(usage_table(page, "type"), expected_usage(model, "type"), "type")
    assert_usage_table(usage_table(page, "layer"), expected_usage(model, "layer"), "layer")
    load_folder(page, planted)  # another adapter: both tables follow it
    assert list(usage_table(page, "type")["type"]) == ["q_proj", "v_proj"]
    np.testing.assert_allclose(usage_table(page, "layer")["used_90"], [RANKS[0] / 8, RANKS[1] / 8])


def test_the_spectrum_follows_the_module_picked(page: AppTest, planted: Path) -> None:
    load_folder(page, planted)
    bars = chart(page, "lx_inspect_spectrum")["data"][0]
    assert np.count_nonzero(array(bars["y"]) > 1e-6) == RANKS[0]
    page.selectbox(key="lx_inspect_module").set_value("model.layers.1.self_attn.v_proj").run()
    bars = chart(page, "lx_inspect_spectrum")["data"][0]
    assert np.count_nonzero(array(bars["y"]) > 1e-6) == RANKS[1]


def test_right_size_answers_its_widgets_and_prepares_a_download(page: AppTest, planted: Path) -> None:
    load_folder(page, planted)
    # 99% of each update's energy: each keeps its planted rank (error ~0), so r=2 for half, 5 the rest
    assert metric(page, "New r") in ("2", "5") and metric(page, "Modules in rank_pattern") == "2"
    assert float(metric(page, "Relative error")) < 1e-5
    page.radio(key="lx_inspect_mode").set_value("global").run()
    assert metric(page, "New r") == "5" and metric(page, "Modules in rank_pattern") == "0"
    page.select_slider(key="lx_inspect_energy").set_value(0.5).run()
    assert metric(page, "New r") == "3"  # 3 of 5 equal values hold 60%
    assert float(metric(page, "Relative error")) > 0.1
    page.button(key="lx_inspect_prepare").click().run()
    assert not page.exception and not page.error
    assert next(b.label for b in page.get("download_button")).startswith("Download the right-sized adapter")


def test_compare_with_itself_is_similarity_one(page: AppTest, planted: Path) -> None:
    load_folder(page, planted)
    load_folder(page, planted, "lx_inspect_other", "lx_inspect_compare")
    table = next(d.value for d in page.dataframe if "phi_k" in d.value.columns)
    np.testing.assert_allclose(table["phi_k"], 1, atol=1e-9)
    phi = chart(page, "lx_inspect_phi")["data"][0]
    assert array(phi["z"]).shape == (8, 8)


# A '../' name that reaches a real file from wherever the tests run: a fixed "../../etc/passwd"
# exists from /work/main but not from a deeper checkout such as CI's, where it read "no such folder".
UP_TO_PASSWD = os.path.relpath("/etc/passwd")
assert UP_TO_PASSWD.startswith("../")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("/no/such/adapter", "no such folder or zip"),
        ("someone/adapter", "the Hub is unreachable"),
        (UP_TO_PASSWD, "not a zip"),
        ("a" * 5000, "not a path"),
    ],
)
def test_bad_input_is_one_line_and_keeps_the_adapter_shown(page: AppTest, planted: Path, value, words) -> None:
    load_folder(page, planted)
    load_folder(page, value)
    assert len(page.error) == 1 and words in page.error[0].value and "\n" not in page.error[0].value
    assert chart(page, "lx_inspect_heatmap")["data"][0]["x"] == ["q_proj", "v_proj"]  # still the planted one


HOSTILE = [
    "\x00",
    "x" * 10_000,
    "/proc/self/environ",
    "/bin/ls",
    "/proc",
    "\u202eevil\u202c \U0001f916",
    "",
    "   \t ",
    "[]",
    "[" * 5_000,
]


def test_hostile_text_in_either_field_is_one_line(page: AppTest, planted: Path) -> None:
    load_folder(page, planted)  # the compare field shows once an adapter is loaded
    sources = ["Folder or zip on the server", "Hub id"]
    for prefix, button in (("lx_inspect", "lx_inspect_go"), ("lx_inspect_other", "lx_inspect_compare")):
        page.radio(key=f"{prefix}_source").set_value(sources[0]).run()  # shows the text field both sources share
        for index, value in enumerate(HOSTILE):
            page.radio(key=f"{prefix}_source").set_value(sources[index % 2])
            page.text_input(key=f"{prefix}_text").set_value(value)
            page.button(key=button).click().run()
            assert not page.exception, (value[:40], page.exception)
            errors = [e.value for e in page.error]
            assert len(errors) == 1 and "\n" not in errors[0] and len(errors[0]) < 400, (value[:40], errors)


def test_a_file_that_is_not_an_adapter_is_one_line(page: AppTest, tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(os.urandom(400))
    load_folder(page, junk)
    assert len(page.error) == 1 and "not a zip" in page.error[0].value


def test_folders_outside_the_model_roots_are_refused(tmp_path, monkeypatch, planted: Path) -> None:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LORA_EXPLORER_MODEL_ROOTS", str(tmp_path / "models"))
    at = open_page()
    load_folder(at, planted)
    assert "local paths are limited" in at.error[0].value


@pytest.mark.slow
def test_an_adapter_trained_by_the_app_on_the_embedded_model_is_inspected_end_to_end(tmp_path, monkeypatch) -> None:
    """A 2-step run on the embedded SmolLM2 (CLI `train`), then its adapter on the page (from the
    run store) and through `inspect` (the subcommand's parser, and `python -m lora_core`)."""
    data = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lora_core", "train", "--model", "embedded", "--steps", "2", "--out", str(data)]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout)

    monkeypatch.setenv("LORA_EXPLORER_DATA", str(data))
    at = open_page()
    at.button(key="lx_inspect_go").click().run()  # the first source is the run store, its newest run picked
    assert not at.exception and not at.error, at.error
    heat = chart(at, "lx_inspect_heatmap")["data"][0]
    assert heat["y"] == [str(layer) for layer in range(30)] and set(heat["x"]) == {"q_proj", "v_proj"}
    assert 0 < np.nanmin(array(heat["z"])) <= np.nanmax(array(heat["z"])) <= 1

    out = tmp_path / "small"
    assert (
        run_inspect(f"run:{run['run_id']}", "--store", str(data), "--right-size", "0.9", "--out", str(out), "--json")
        == 0
    )
    assert (out / "adapter_config.json").is_file()
    cli = [sys.executable, "-m", "lora_core", "inspect", f"run:{run['run_id']}", "--store", str(data), "--json"]
    report = json.loads(subprocess.run(cli, capture_output=True, text=True, env=env, check=True).stdout)
    assert len(report["modules"]) == 60 and {row["r"] for row in report["modules"]} == {8}


def test_compare_with_an_untrained_adapter_says_there_is_no_direction(page: AppTest, planted: Path, tmp_path) -> None:
    """B = 0 (PEFT's initialisation): phi is undefined, and the caption says why instead of 'nan'."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    untrained = tmp_path / "untrained"
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        untrained
    )
    load_folder(page, planted)
    load_folder(page, untrained, "lx_inspect_other", "lx_inspect_compare")
    captions = [c.value for c in page.caption]
    assert any("no direction to compare (an update is zero)" in c for c in captions), captions
    assert not any("nan" in c for c in captions)


def test_a_refused_zip_leaves_nothing_in_the_data_folder(page: AppTest, planted: Path, tmp_path) -> None:
    config = json.loads((planted / "adapter_config.json").read_text())
    source = tmp_path / "bad.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({**config, "peft_type": "IA3"}))
        archive.writestr("adapter_model.safetensors", (planted / "adapter_model.safetensors").read_bytes())
    load_folder(page, source)
    assert len(page.error) == 1 and "only LoRA" in page.error[0].value
    unpacked = tmp_path / "data" / "inspect"
    assert not unpacked.exists() or not any(unpacked.iterdir())
