"""Layer x head heatmap of a selection's attention entries (``esa.analyses.components.per_head``
cells): one row per layer, one column per head slice (q, k, v, o projection of each head, grouped by
projection), colour = selected entries (or any other column of the cell table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from esa.plots import figure

_ORDER = {"attn_q": 0, "attn_k": 1, "attn_v": 2, "attn_o": 3}


def _label(component: str, head: int) -> str:
    return f"{component.removeprefix('attn_')}{head if head >= 0 else '-'}"


def plot_head_heatmap(
    cells: pd.DataFrame, value: str = "count", title: str = "selected entries per head"
) -> Figure:
    """Heatmap of ``value`` per layer (rows) and head slice (columns ``q0 q1 ... k0 ... o7``, white
    lines between projections). ``cells`` has columns layer, component, head and ``value``; absent
    cells are 0. Annotated with the values when there are at most 200 cells."""
    if not {"layer", "component", "head", value} <= set(cells.columns):
        raise ValueError(f"cells need columns layer, component, head and {value!r} (per_head output)")
    cols = sorted(
        {(str(c), int(h)) for c, h in zip(cells["component"], cells["head"])},
        key=lambda ch: (_ORDER.get(ch[0], len(_ORDER)), ch[0], ch[1]),
    )
    layers = sorted({int(v) for v in cells["layer"]})
    data = np.zeros((len(layers), len(cols)))
    index = {c: i for i, c in enumerate(cols)}
    row_of = {v: i for i, v in enumerate(layers)}
    for layer, comp, head, v in zip(cells["layer"], cells["component"], cells["head"], cells[value]):
        data[row_of[int(layer)], index[(str(comp), int(head))]] += float(v)
    fig, ax = figure(max(5.0, 1.6 + 0.32 * len(cols)), max(3.0, 1.3 + 0.3 * len(layers)))
    im = ax.imshow(
        data if data.size else np.zeros((1, 1)), aspect="auto", cmap="viridis", interpolation="nearest"
    )
    ax.set_xticks(range(len(cols)), [_label(c, h) for c, h in cols], rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    for i in range(1, len(cols)):
        if cols[i][0] != cols[i - 1][0]:
            ax.axvline(i - 0.5, color="white", linewidth=1.5)
    ax.set_xlabel("head slice (projection, head)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=value)
    if 0 < data.size <= 200:
        vmax = float(data.max())
        for (r, c), v in np.ndenumerate(data):
            if v:
                color = "black" if v > 0.6 * vmax else "white"
                ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7, color=color)
    return fig
