"""AppTest for every page: it renders without exception, and moving a widget changes a number or a
chart's data (read from the Plotly figure JSON)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

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
    assert any("rank components are active" in w.value for w in at.warning)


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
