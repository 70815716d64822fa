"""The Experiments page's figures, built from what `lora_core.experiments` returns: the trials'
loss curves, loss against cost with its Pareto front, and parallel coordinates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lora_core.experiments import pareto_front

# What a trial spends, by `results` column, as an axis title.
COSTS = {
    "trainable_params": "trainable parameters",
    "peak_memory_mb": "measured peak memory (MiB)",
    "train_seconds": "wall time (s)",
}
PANEL_COLUMNS = 4


@dataclass(frozen=True)
class Curve:
    """One trial's points: its number (1-based), grid values, label and metric rows."""

    number: int
    values: Mapping[str, Any]
    label: str
    points: pd.DataFrame


def value_text(value: Any) -> str:
    """A grid value as a legend or axis label: LoRA+ off and the flags read off/on."""
    if value is None or value == "off":
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def group_label(number: int, values: Mapping[str, Any], dimension: str) -> str:
    """What colours a trial: "r=16" for its value of `dimension`, or "#3" by trial."""
    return f"#{number}" if dimension == "trial" else f"{dimension}={value_text(values.get(dimension))}"


def colours(groups: Sequence[str]) -> dict[str, str]:
    """One colour per group, in the order the groups first appear."""
    palette = qualitative.Plotly
    return {group: palette[i % len(palette)] for i, group in enumerate(dict.fromkeys(groups))}


def loss_curves(curves: Sequence[Curve], colour_by: str, overlaid: bool) -> go.Figure:
    """The trials' loss curves (train solid, eval dashed with markers) coloured by `colour_by`:
    all in one chart, or one small panel per trial."""
    groups = [group_label(c.number, c.values, colour_by) for c in curves]
    palette = colours(groups)
    rows = max(1, math.ceil(len(curves) / PANEL_COLUMNS))
    if overlaid:
        figure = go.Figure()
    else:
        titles = [c.label[:40] for c in curves]
        figure = make_subplots(rows=rows, cols=PANEL_COLUMNS, subplot_titles=titles, shared_yaxes=True)
    seen: set[str] = set()
    for position, (curve, group) in enumerate(zip(curves, groups, strict=True)):
        cell = {} if overlaid else {"row": position // PANEL_COLUMNS + 1, "col": position % PANEL_COLUMNS + 1}
        for kind, dash in (("train", None), ("eval", "dash")):
            points = curve.points[curve.points["kind"] == kind]
            if points.empty:
                continue
            figure.add_trace(
                go.Scatter(
                    x=points["step"], y=points["loss"], mode="lines+markers" if kind == "eval" else "lines",
                    name=group, legendgroup=group, showlegend=group not in seen,
                    line={"color": palette[group], "dash": dash}, hovertext=f"{curve.label} ({kind})",
                ),
                **cell,
            )  # fmt: skip
            seen.add(group)
    figure.update_layout(
        height=440 if overlaid else 60 + 200 * rows,
        legend={"orientation": "h", "y": -0.15},
        legend_title_text=colour_by,
    )
    if overlaid:
        figure.update_layout(xaxis_title="step", yaxis_title="loss (train solid, eval dashed)")
    return figure


def pareto_figure(done: pd.DataFrame, cost: str, colour_by: str) -> go.Figure:
    """Final eval loss against `cost` (a `COSTS` column), one point per completed trial (rows of
    `results`) coloured by `colour_by`, and the Pareto front (no other trial both cheaper and
    lower) joined by a dotted line."""
    groups = [group_label(int(row["trial"]), row, colour_by) for row in done.to_dict("records")]
    palette = colours(groups)
    figure = go.Figure()
    for group, colour in palette.items():
        rows = done[[g == group for g in groups]]
        figure.add_trace(
            go.Scatter(
                x=rows[cost], y=rows["final_eval_loss"], mode="markers", name=group, text=rows["label"],
                marker={"color": colour, "size": 11}, hovertemplate="%{text}<br>%{x:,}, loss %{y:.4f}",
            )
        )  # fmt: skip
    front = done[pareto_front(done, cost)].sort_values(cost)
    figure.add_trace(
        go.Scatter(
            x=front[cost], y=front["final_eval_loss"], mode="lines+markers", name="Pareto front",
            line={"color": "black", "dash": "dot"}, marker={"symbol": "circle-open", "size": 17, "color": "black"},
            text=front["label"], hovertemplate="%{text}<br>on the front",
        )
    )  # fmt: skip
    figure.update_layout(
        xaxis_title=COSTS[cost], yaxis_title="final eval loss", height=420, legend_title_text=colour_by,
        xaxis_type="log" if cost == "trainable_params" else "linear",
    )  # fmt: skip
    return figure


def parallel_figure(done: pd.DataFrame, dimensions: Sequence[str]) -> go.Figure:
    """One line per completed trial through its values of `dimensions`, its trainable parameters
    and its final eval loss, coloured by that loss. Values that are not all numbers (targets,
    flags, LoRA+ off, alpha as 2r) become categories in the order they first appear."""
    axes = []
    for name in dimensions:
        numeric = pd.to_numeric(done[name], errors="coerce")
        if numeric.notna().all() and not done[name].map(lambda v: isinstance(v, bool)).any():
            axes.append({"label": name, "values": numeric.astype(float)})
            continue
        text = done[name].map(value_text)
        labels = list(dict.fromkeys(text))
        axes.append(
            {"label": name, "values": text.map(labels.index), "tickvals": list(range(len(labels))), "ticktext": labels}
        )
    axes.append({"label": "trainable params", "values": done["trainable_params"].astype(float)})
    axes.append({"label": "final eval loss", "values": done["final_eval_loss"].astype(float)})
    line = {"color": done["final_eval_loss"].astype(float), "colorscale": "Viridis_r", "showscale": True}
    figure = go.Figure(go.Parcoords(line=line, dimensions=axes))
    figure.update_layout(height=420, margin={"l": 70, "r": 70})  # room for the outer axes' labels
    return figure
