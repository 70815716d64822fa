"""AppTest for every page: it renders without exception, and moving a widget changes a number or a
chart's data (read from the Plotly figure JSON)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lora_core import resolve_model
from lora_core.options import BIASES
from pages.common import SIDEBAR_DEFAULTS, load_link, write_link

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ["overview", "rank", "alpha", "targets", "dropout", "search", "memory", "export"]


def open_page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    if name != "overview":
        at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def values(field) -> list:
    """A trace array from figure JSON: plotly 7 writes numpy data as base64 typed arrays."""
    if isinstance(field, dict) and "bdata" in field:
        array = np.frombuffer(base64.b64decode(field["bdata"]), dtype=np.dtype(field["dtype"]))
        return array.reshape(field["shape"]).tolist() if "shape" in field else array.tolist()
    return list(field)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def frame(at: AppTest, index: int = 0):
    return at.dataframe[index].value


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_with_its_title(name: str) -> None:
    at = open_page(name)
    titles = {"overview": "LoRA Explorer", "rank": "Rank", "alpha": "Alpha", "targets": "Target modules"}
    titles |= {"dropout": "Dropout", "search": "Search spaces", "memory": "Memory", "export": "Export"}
    assert at.title[0].value == titles[name]
    assert not at.error


def test_overview_scenario_apply_sets_the_sidebar() -> None:
    at = open_page("overview")
    at.button(key="lx_apply_code_generation").click().run()
    assert at.slider(key="lx_r").value == 64
    assert at.number_input(key="lx_alpha").value == 128
    assert metric(at, "Trainable parameters") == f"{64 * (4096 * 4 * 2 + (4096 + 11008) * 3) * 32:,}"


def test_rank_page_simulation_follows_its_sliders() -> None:
    at = open_page("rank")
    before = values(charts(at)[1]["data"][0]["y"])
    at.slider(key="lx_sim_true_rank").set_value(4).run()
    after = values(charts(at)[1]["data"][0]["y"])
    assert len(before) == len(after) == 100 and before != after
    floors = at.dataframe[0].value
    assert bool(floors.set_index("rank").loc[2, "capacity_bound"]) is True
    assert bool(floors.set_index("rank").loc[8, "capacity_bound"]) is False


def test_rank_page_cost_curve_follows_the_strategy() -> None:
    at = open_page("rank")
    attention = values(charts(at)[0]["data"][0]["y"])
    at.selectbox(key="lx_strategy").set_value("All linear").run()
    all_linear = values(charts(at)[0]["data"][0]["y"])
    assert attention[15] == 16_777_216 and all_linear[15] == 39_976_960  # r=16 on Llama-2-7b
    at.multiselect(key="lx_rank_compare").set_value(["facebook/opt-125m"]).run()
    assert len(charts(at)[0]["data"]) == 2


def test_alpha_page_follows_rank_and_alpha() -> None:
    at = open_page("alpha")
    assert metric(at, "Effective scale of the current config") == "2.000"
    at.number_input(key="lx_alpha").set_value(64.0).run()
    assert metric(at, "Effective scale of the current config") == "4.000"
    before = frame(at, 0)["lora_ratio"].tolist()
    at.slider(key="lx_alpha_stats_rank").set_value(32).run()
    assert frame(at, 0)["lora_ratio"].tolist() != before


def test_alpha_page_flags_an_unusual_ratio() -> None:
    at = open_page("alpha")
    at.number_input(key="lx_alpha").set_value(256.0).run()
    assert any("unusually high" in w.value for w in at.warning)


def test_targets_page_compares_strategies_and_applies_a_layer_range() -> None:
    at = open_page("targets")
    table = frame(at, 0)
    assert table["trainable_params"].tolist() == [8_388_608, 16_777_216, 23_199_744, 39_976_960]
    at.toggle(key="lx_limit_layers").set_value(True).run()
    at.slider(key="lx_layer_range").set_value((0, 15)).run()
    at.button(key="lx_apply_patterns").click().run()
    assert not at.exception
    assert metric(at, "Trainable parameters") == f"{16_777_216 // 2:,}"


def test_targets_page_chart_follows_rank() -> None:
    at = open_page("targets")
    before = values(charts(at)[0]["data"][0]["y"])
    at.slider(key="lx_r").set_value(32).run()
    assert values(charts(at)[0]["data"][0]["y"]) == [2 * v for v in before]


def test_dropout_page_statistics_follow_the_sliders() -> None:
    at = open_page("dropout")
    stats = frame(at, 0)
    assert stats.loc[stats["dropout"] == 0.0, "std"].iloc[0] == 0.0
    before = stats["std"].tolist()
    at.slider(key="lx_drop_rank").set_value(4).run()
    assert frame(at, 0)["std"].tolist() != before
    histogram = charts(at)[0]
    assert len(histogram["data"]) == len(stats)
    # binned on the server: each rate's bars hold all 1,000 passes x 256 outputs
    assert all(sum(values(trace["y"])) == 1000 * 256 for trace in histogram["data"])


def test_memory_page_follows_the_setup_and_the_sidebar() -> None:
    at = open_page("memory")
    peak = lambda: float(metric(at, "Peak (train)").split()[0])  # noqa: E731
    terms = frame(at, 0).set_index("term")
    assert {"base weights", "LoRA parameters", "activations: base layers", "logits and loss"} <= set(terms.index)
    bar = charts(at)[0]
    assert sum(values(trace["x"])[0] for trace in bar["data"]) == pytest.approx(terms["GiB"].sum(), rel=1e-6)
    first = peak()
    at.number_input(key="lx_mem_batch").set_value(8).run()
    assert peak() > first
    at.toggle(key="lx_mem_checkpointing").set_value(True).run()
    checkpointed = peak()
    assert checkpointed < first
    at.selectbox(key="lx_mem_quant").set_value("nf4").run()
    assert peak() < checkpointed and "base weights: 4-bit NF4 layers" in frame(at, 0)["term"].tolist()
    fits = frame(at, 1)
    assert fits["GPU GiB"].tolist() == [24, 40, 48, 80, 141]
    strategies = frame(at, 2).set_index("strategy")
    assert strategies.loc["All linear", "required GiB"] > strategies.loc["Q,V", "required GiB"]
    before = peak()
    at.slider(key="lx_r").set_value(128).run()  # the sidebar's rank reaches the estimate
    assert peak() > before


def test_memory_page_refuses_a_bad_setup_in_one_line_and_keeps_it() -> None:
    at = open_page("memory")
    at.selectbox(key="lx_mem_quant").set_value("nf4")
    at.radio(key="lx_mem_device").set_value("cpu").run()
    assert len(at.error) == 1 and "needs device 'cuda'" in at.error[0].value
    assert at.selectbox(key="lx_mem_quant").value == "nf4"  # nothing the user chose is lost


def test_dropout_page_warns_for_low_rank_with_dropout() -> None:
    at = open_page("dropout")
    at.slider(key="lx_r").set_value(4).run()
    assert any("PEFT drops input features" in w.value and "all 4 components" in w.value for w in at.warning)


def test_search_page_grid_sizes_and_download() -> None:
    at = open_page("search")
    assert len(frame(at, 0)) == 36
    at.radio(key="lx_search_priority").set_value("efficiency").run()
    table = frame(at, 0)
    assert len(table) == 4
    assert table["trainable_params"].tolist() == [4_194_304, 4_194_304, 8_388_608, 8_388_608]  # q,v at r=8, 16
    assert len(charts(at)[0]["data"]) == 1


def test_export_page_shows_every_format_and_the_sidebar_download() -> None:
    at = open_page("export")
    codes = [c.value for c in at.code]
    assert len(codes) == 5
    peft = json.loads(codes[0])
    assert peft["r"] == 16 and peft["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "lora_r: 16" in codes[2] and "lora_rank: 16" in codes[3] and "get_peft_model" in codes[4]
    at.slider(key="lx_r").set_value(8).run()
    assert json.loads(at.code[0].value)["r"] == 8


def test_link_parameters_preset_the_sidebar() -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"model": "facebook/opt-125m", "r": "8", "targets": "Q,V"})
    at.run()
    assert not at.exception
    assert at.slider(key="lx_r").value == 8
    assert metric(at, "Trainable parameters") == "294,912"


def test_bad_link_parameters_fall_back_with_a_notice() -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"model": "nobody/nothing", "r": "abc", "dropout": "7"})
    at.run()
    assert not at.exception
    notice = " ".join(w.value for w in at.sidebar.warning)
    assert "model=nobody/nothing" in notice and "r=abc" in notice and "dropout=7" in notice
    assert metric(at, "Trainable parameters") == "16,777,216"


@pytest.mark.parametrize("bias", BIASES)
def test_a_written_link_reads_back_to_the_same_settings(bias: str) -> None:
    """What `write_link` puts in the URL, `load_link` takes back into a new session unchanged."""
    spec = resolve_model("facebook/opt-125m")
    accepted = SIDEBAR_DEFAULTS | {"lx_catalogue_choice": spec.model_id, "lx_r": 12, "lx_alpha": 0.1}
    accepted |= {"lx_strategy": "Custom", "lx_custom_targets": "re:.*proj", "lx_rslora": True, "lx_bias": bias}
    params: dict[str, str] = {}
    write_link(params, {"lx_ok": accepted, "lx_spec": spec})
    session: dict = {}
    load_link(params, session)
    assert session.pop("lx_spec") == spec
    assert SIDEBAR_DEFAULTS | session == accepted


@pytest.mark.parametrize("bias", BIASES)
def test_the_bias_box_offers_the_engine_choices_and_a_link_sets_it(bias: str) -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"bias": bias})
    at.run()
    assert not at.exception and not at.sidebar.warning
    assert at.selectbox(key="lx_bias").options == list(BIASES)
    assert at.selectbox(key="lx_bias").value == bias
    assert at.session_state["lx_ok"]["lx_bias"] == bias


def test_a_link_bias_the_engine_does_not_know_keeps_the_default() -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"bias": "lora"})
    at.run()
    assert not at.exception
    assert "bias=lora" in " ".join(w.value for w in at.sidebar.warning)
    assert at.selectbox(key="lx_bias").value == "none"


# --- hostile input: each defect below was a traceback or a silent change before the fix ---------

EVERY_PAGE = [*PAGES, "finetune", "experiments"]


def visit_every_page(at: AppTest) -> None:
    """Open each page in this session: none may show an exception or raise one."""
    for name in EVERY_PAGE:
        at.switch_page(f"pages/{name}.py").run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert not at.get("exception"), name


def sidebar_settings(at: AppTest) -> tuple:
    return (
        at.session_state["lx_spec"].model_id,
        at.slider(key="lx_r").value,
        at.number_input(key="lx_alpha").value,
        at.selectbox(key="lx_strategy").value,
    )


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_invalid_custom_regex_is_one_sidebar_error_and_every_page_renders(data_dir) -> None:
    at = open_page("overview")
    at.selectbox(key="lx_strategy").set_value("Custom").run()
    at.text_input(key="lx_custom_targets").set_value("re:[").run()
    assert not at.exception
    assert len(at.sidebar.error) == 1 and "not a valid regex" in at.sidebar.error[0].value
    assert "q_proj, v_proj" in at.sidebar.error[0].value  # what the count still uses
    assert metric(at, "Trainable parameters") == "8,388,608"  # the last valid targets: q_proj, v_proj
    visit_every_page(at)
    assert len(at.sidebar.error) == 1


def test_link_with_an_invalid_custom_regex_keeps_the_default_with_a_notice() -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"targets": "Custom", "custom": "re:["})
    at.run()
    assert not at.exception
    notice = " ".join(w.value for w in at.sidebar.warning)
    assert "custom=re:[" in notice and "could not be used" in notice
    assert at.text_input(key="lx_custom_targets").value == "q_proj, v_proj"
    assert metric(at, "Trainable parameters") == "8,388,608"


def test_link_takes_any_alpha_the_engine_takes_and_refuses_the_rest() -> None:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"alpha": "5000", "dropout": "0.7"})
    at.run()
    assert not at.exception and not at.sidebar.warning
    assert at.number_input(key="lx_alpha").value == 5000 and at.slider(key="lx_dropout").value == 0.7
    for bad in ("0", "-1", "nan", "inf", "1e999"):
        at = AppTest.from_file(APP, default_timeout=180)
        at.query_params.update({"alpha": bad})
        at.run()
        assert not at.exception
        assert f"alpha={bad}" in " ".join(w.value for w in at.sidebar.warning)
        assert at.number_input(key="lx_alpha").value == 32


def test_import_of_an_invalid_regex_is_refused_and_keeps_the_settings() -> None:
    at = open_page("export")
    before = sidebar_settings(at)
    payload = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": "re:["}).encode()
    at.file_uploader(key="lx_import_upload").set_value(("adapter_config.json", payload, "application/json")).run()
    assert not at.exception
    assert any(e.value.startswith("Not imported") and "not a valid regex" in e.value for e in at.error)
    assert "lx_import_apply" not in [b.key for b in at.button]
    assert sidebar_settings(at) == before


def import_and_apply(at: AppTest, config: dict) -> None:
    payload = json.dumps(config).encode()
    at.file_uploader(key="lx_import_upload").set_value(("adapter_config.json", payload, "application/json")).run()
    assert not at.exception, at.exception
    at.button(key="lx_import_apply").click().run()
    assert not at.exception, at.exception


@pytest.mark.parametrize("alpha", [5000, 0.25, 1e-3, 1e6])
def test_import_of_any_valid_alpha_reaches_the_sidebar_unchanged(alpha: float) -> None:
    at = open_page("export")
    import_and_apply(at, {"r": 8, "lora_alpha": alpha, "lora_dropout": 0.7, "target_modules": ["q_proj", "v_proj"]})
    assert at.number_input(key="lx_alpha").value == alpha
    assert at.slider(key="lx_dropout").value == 0.7
    assert not at.sidebar.error
    assert json.loads(at.code[0].value)["lora_alpha"] == alpha


def test_import_the_sidebar_cannot_hold_is_refused_in_one_line() -> None:
    at = open_page("export")
    before = sidebar_settings(at)
    for config, words in [
        ({"r": 512, "target_modules": ["q_proj"]}, "r=512"),
        ({"r": 8, "lora_dropout": 0.995, "target_modules": ["q_proj"]}, "lora_dropout=0.995"),
    ]:
        payload = json.dumps(config).encode()
        at.file_uploader(key="lx_import_upload").set_value(("a.json", payload, "application/json")).run()
        assert not at.exception
        assert any(e.value.startswith("Not imported") and words in e.value for e in at.error), [
            e.value for e in at.error
        ]
        assert "lx_import_apply" not in [b.key for b in at.button]
        assert sidebar_settings(at) == before


def test_import_names_what_the_sidebar_leaves_out() -> None:
    at = open_page("export")
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["k_proj"]}
    config |= {"modules_to_save": ["lm_head"], "init_lora_weights": "gaussian"}
    payload = json.dumps(config).encode()
    at.file_uploader(key="lx_import_upload").set_value(("a.json", payload, "application/json")).run()
    notes = " ".join(w.value for w in at.warning)
    assert all(name in notes for name in ("exclude_modules", "modules_to_save", "init_lora_weights")), notes


def test_import_without_target_modules_takes_peft_default_for_the_model() -> None:
    at = open_page("export")
    import_and_apply(at, {"r": 8, "lora_alpha": 16})
    assert at.selectbox(key="lx_strategy").value == "Q,V"  # PEFT's default for llama: q_proj, v_proj
    assert metric(at, "Trainable parameters") == "4,194,304"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        b"",
        b"   \n\t ",
        b"[]",
        b'{"r": "8"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"target_modules": ["q_proj"], "eva_config": []}',
        b'{"target_modules": ["q_proj"], "layer_replication": ' + b"[" * 900 + b"]" * 900 + b"}",
        b"{}" + b" " * 2_000_000,
    ],
)
def test_import_of_a_hostile_file_is_refused_in_one_line(payload: bytes) -> None:
    at = open_page("export")
    before = sidebar_settings(at)
    at.file_uploader(key="lx_import_upload").set_value(("adapter_config.json", payload, "application/json")).run()
    assert not at.exception, at.exception
    refusals = [e.value for e in at.error if e.value.startswith("Not imported")]
    assert len(refusals) == 1 and "\n" not in refusals[0], [e.value for e in at.error]
    assert sidebar_settings(at) == before


def test_import_over_the_limit_is_refused_before_parsing() -> None:
    at = open_page("export")
    payload = b'{"r": 8, "target_modules": ["q_proj"]}' + b" " * 2_000_000  # valid JSON, 2 MB
    at.file_uploader(key="lx_import_upload").set_value(("adapter_config.json", payload, "application/json")).run()
    assert any("Not imported" in e.value and "1 MB" in e.value for e in at.error), [e.value for e in at.error]


def load_model_text(at: AppTest, text: str) -> None:
    at.radio(key="lx_source").set_value("Hub id or path").run()
    at.text_input(key="lx_model_text").set_value(text).run()
    at.button(key="lx_load").click().run()
    assert not at.exception, at.exception


def test_binary_model_path_is_one_line_and_keeps_model_and_settings(monkeypatch) -> None:
    monkeypatch.delenv("LORA_EXPLORER_MODEL_ROOTS", raising=False)
    at = open_page("overview")
    at.selectbox(key="lx_catalogue_choice").set_value("facebook/opt-125m").run()
    at.slider(key="lx_r").set_value(8).run()
    at.number_input(key="lx_alpha").set_value(24.0).run()
    at.selectbox(key="lx_strategy").set_value("Q,V").run()
    before = sidebar_settings(at)
    load_model_text(at, "/bin/ls")
    assert [e.value for e in at.sidebar.error] == [
        "/bin/ls: not valid JSON (not UTF-8 text); upload the model's config.json (keeping facebook/opt-125m)"
    ]
    assert sidebar_settings(at) == before
    assert metric(at, "Trainable parameters") == "294,912"
    visit_every_page(at)
    assert sidebar_settings(at) == before


def test_model_paths_outside_the_server_roots_all_get_the_same_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_EXPLORER_MODEL_ROOTS", str(tmp_path / "models"))
    at = open_page("overview")
    messages = []
    for path in ("/etc/passwd", "/bin/ls", "/no/such/file", "../../etc/passwd"):
        load_model_text(at, path)
        messages.append(at.sidebar.error[0].value.replace(path, "PATH"))
    assert len(set(messages)) == 1 and "limited to" in messages[0], messages
    assert at.session_state["lx_spec"].model_id == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("layers", [[40, 41], [0, 5, 9]])
def test_imported_layers_outside_a_range_of_this_model_are_shown_not_clamped(layers: list[int]) -> None:
    at = open_page("export")
    import_and_apply(at, {"r": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": layers})
    assert at.session_state["lx_layers"] == tuple(layers)
    at.switch_page("pages/targets.py").run()
    assert not at.exception, at.exception
    assert any("not a range of this model's 32 layers" in i.value for i in at.info)
    assert at.session_state["lx_layers"] == tuple(layers)  # nothing changes until Apply
