"""Reference lines and bands for plotly figures, as plain layout dicts added in one `update_layout`:
plotly's add_vline/add_vrect validate every shape against every subplot, ~20 ms each per rerun."""

from __future__ import annotations


def vline(x: float, text: str, position: str = "bottom right") -> tuple[dict, dict]:
    """A dotted vertical line across the plot at `x`, and its label."""
    shape = {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1}
    shape["line"] = {"dash": "dot", "width": 1.5, "color": "#444"}
    return shape, _label(x, "x", text, position)


def hline(y: float, text: str, position: str = "top right") -> tuple[dict, dict]:
    """A dotted horizontal line across the plot at `y`, and its label."""
    shape = {"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": y, "y1": y}
    shape["line"] = {"dash": "dot", "width": 1.5, "color": "#444"}
    return shape, _label(y, "y", text, position)


def vband(x0: float, x1: float, text: str) -> tuple[dict, dict]:
    """A faint shaded band between `x0` and `x1`, labelled at its top left."""
    shape = {"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1}
    shape |= {"fillcolor": "#636efa", "opacity": 0.08, "line": {"width": 0}, "layer": "below"}
    return shape, _label(x0, "x", text, "top left")


def _label(at: float, axis: str, text: str, position: str) -> dict:
    vertical, horizontal = position.split()
    if axis == "x":
        label = {"x": at, "xref": "x", "yref": "paper", "y": 1 if vertical == "top" else 0}
        label |= {"xanchor": "left" if horizontal == "right" else "right", "yanchor": vertical}
        if horizontal == "left" and vertical == "top":  # a band's label sits inside it
            label["xanchor"] = "left"
    else:
        label = {"y": at, "yref": "y", "xref": "paper", "x": 1 if horizontal == "right" else 0}
        label |= {"xanchor": horizontal, "yanchor": "bottom" if vertical == "top" else "top"}
    return label | {"text": text, "showarrow": False}


def add_markers(figure, *markers: tuple[dict, dict]) -> None:
    """Add `vline`/`hline`/`vband` markers to `figure` in one layout update."""
    figure.update_layout(
        shapes=[*figure.layout.shapes, *(shape for shape, _ in markers)],
        annotations=[*figure.layout.annotations, *(label for _, label in markers)],
    )
