"""The Dropout page's study section: findings, one map per rank, curves that follow the pickers,
and bad input refused in one line with the user's choices kept."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from lora_core.dropout_study import DEFAULT_STUDY

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def open_dropout() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("pages/dropout.py").run()
    assert not at.exception, at.exception
    return at


def array(field) -> np.ndarray:
    """A trace array from figure JSON: plotly writes numpy data as base64 typed arrays."""
    if isinstance(field, dict) and "bdata" in field:
        flat = np.frombuffer(base64.b64decode(field["bdata"]), dtype=np.dtype(field["dtype"]))
        shape = field.get("shape")  # "rows, columns" for a 2-D array
        return flat.reshape([int(n) for n in str(shape).split(",")]) if shape else flat
    return np.asarray(field)


def study_charts(at: AppTest) -> tuple[dict, dict]:
    """The study's map and curves: the page's last two charts (the histograms come first)."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return specs[-2], specs[-1]


def test_study_renders_findings_maps_and_curves() -> None:
    at = open_dropout()
    assert not at.error
    findings = [m.value for m in at.markdown if m.value.startswith("- *")]
    assert len(findings) == 5 and any("ranks <= 4" in f for f in findings)
    heatmap, curves = study_charts(at)
    assert [t["type"] for t in heatmap["data"]] == ["heatmap"] * len(DEFAULT_STUDY.ranks)
    assert len(curves["data"]) == 2 * len(DEFAULT_STUDY.rates)  # held-out and train per rate
    table = at.dataframe[-1].value
    assert len(table) == len(DEFAULT_STUDY.ranks) * len(DEFAULT_STUDY.samples)
    # the p=0 column of every map is the baseline itself: 0% change
    first = heatmap["data"][0]
    change = array(first["z"])  # (samples, rates), % vs p=0
    assert first["x"][0] == "p=0" and change.shape == (len(DEFAULT_STUDY.samples), len(DEFAULT_STUDY.rates))
    assert np.allclose(change[:, 0], 0) and np.isfinite(change).all() and np.abs(change[:, 1:]).max() > 1

    before = curves["data"][0]
    at.selectbox(key="lx_study_curve_rank").set_value(DEFAULT_STUDY.ranks[0]).run()
    assert study_charts(at)[1]["data"][0] != before
    at.multiselect(key="lx_study_ranks").set_value([4, 16]).run()
    assert len(study_charts(at)[0]["data"]) == 2


def test_bad_study_input_is_one_line_and_keeps_the_choices() -> None:
    at = open_dropout()
    at.multiselect(key="lx_study_rates").set_value([0.1, 0.3])
    at.multiselect(key="lx_study_samples").set_value([]).run()
    assert len(at.error) == 1 and at.error[0].value == "Study: `samples` must name at least one value"
    assert at.multiselect(key="lx_study_rates").value == [0.1, 0.3]  # nothing the user chose is lost
    assert len(at.get("plotly_chart")) == 2  # the histogram sections above still render
    at.multiselect(key="lx_study_samples").set_value([16, 256]).run()
    assert not at.error and len(study_charts(at)[0]["data"]) == len(DEFAULT_STUDY.ranks)
