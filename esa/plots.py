"""Matplotlib figures for claims and reports (Agg canvas, no pyplot state, no display needed).

Every plot function returns a `matplotlib.figure.Figure`; `render` / `figure_to_base64` /
`save_figure` render it (PNG, and PDF + SVG copies for papers) and close it.
"""

from __future__ import annotations

import base64
import io
import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esa.stats import bootstrap_ci
from esa.util.files import atomic_write

MAX_POINTS = 1_000_000
VECTOR_FORMATS = ("pdf", "svg")  # copies of a PNG figure for papers (save_figure also=, claims)
_COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#0a7f86"]


def figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, Axes]:
    """A new Agg figure (no pyplot state) with one axes, constrained layout."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def symlog_threshold(values) -> float:
    """The linear band of a symlog axis: the decade at or below the smallest non-zero |value| (1.0
    when there is none), so tick labels inside the band do not crowd zero.

    >>> symlog_threshold([0.0, -0.69, 259.8])
    0.1
    """
    v = np.abs(_numpy(values))
    v = v[np.isfinite(v) & (v > 0)]
    return float(10.0 ** math.floor(math.log10(v.min()))) if v.size else 1.0


def _numpy(x) -> np.ndarray:
    """Flat float64 array from a tensor (any device/dtype), array or sequence."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _sample(scores, max_points: int, seed: int) -> tuple[np.ndarray, int]:
    """At most ~max_points values, each tensor sampled in proportion to its size; (values, total)."""
    parts = list(scores.values()) if isinstance(scores, Mapping) else [scores]
    sizes = [int(p.numel()) if hasattr(p, "numel") else int(np.size(p)) for p in parts]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    out = []
    for part, n in zip(parts, sizes):
        if n == 0:
            continue
        take = n if total <= max_points else max(1, math.ceil(n * max_points / total))
        if take < n:
            idx = np.sort(rng.choice(n, size=take, replace=False))
            if hasattr(part, "reshape") and hasattr(part, "detach"):
                import torch

                part = part.reshape(-1)[torch.from_numpy(idx).to(part.device)]
            else:
                part = np.asarray(part).reshape(-1)[idx]
        out.append(_numpy(part))
    return (np.concatenate(out) if out else np.empty(0)), total


def plot_score_distribution(
    scores, title: str = "score distribution", *, max_points: int = MAX_POINTS, seed: int = 0, bins: int = 80
) -> Figure:
    """Histogram of |score| on log-log axes (zeros and non-finite values counted in the legend).

    `scores` is a dict name -> tensor/array (all pooled) or one array; at most ~`max_points`
    values are drawn with a fixed `seed`.
    """
    values, total = _sample(scores, max_points, seed)
    values = np.abs(values)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    fig, ax = figure()
    label = f"n={total:,}" + (f" (sample {values.size:,})" if values.size < total else "")
    if positive.size:
        lo, hi = positive.min(), positive.max()
        edges = np.logspace(np.log10(lo), np.log10(hi if hi > lo else lo * 10), bins + 1)
        ax.hist(positive, bins=list(edges), color=_COLORS[0], alpha=0.85, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(hi, color=_COLORS[1], ls="--", lw=1, label=f"max={hi:.3g}")
    else:
        ax.text(0.5, 0.5, "no positive finite scores", ha="center", va="center", transform=ax.transAxes)
    zeros, bad = int((finite == 0).sum()), int(values.size - finite.size)
    if zeros or bad:
        ax.plot([], [], " ", label=f"zeros={zeros:,} non-finite={bad:,}")
    ax.set_xlabel("|score|")
    ax.set_ylabel("count")
    ax.set_title(title)
    if positive.size or zeros or bad:
        ax.legend(loc="upper right", fontsize=9)
    return fig


def plot_layer_component_heatmap(
    df,
    value: str = "count",
    title: str = "selected entries",
    *,
    agg: str = "sum",
    annotate: bool | None = None,
) -> Figure:
    """Heatmap of layer (rows) x component (columns) from a DataFrame with those columns.

    ``value="count"`` counts rows per cell; any other column is aggregated with `agg`.
    """
    import pandas as pd

    if not {"layer", "component"} <= set(df.columns):
        raise ValueError("df needs columns 'layer' and 'component' (e.g. Selection.to_frame())")
    if value == "count" and "count" not in df.columns:
        table = pd.crosstab(df["layer"], df["component"])
    else:
        table = df.pivot_table(index="layer", columns="component", values=value, aggfunc=agg, fill_value=0)
    table = table.sort_index()
    fig, ax = figure(max(5.0, 1.0 + 0.9 * table.shape[1]), max(3.0, 1.2 + 0.28 * table.shape[0]))
    data = table.to_numpy(dtype=float)
    im = ax.imshow(
        data if data.size else np.zeros((1, 1)), aspect="auto", cmap="viridis", interpolation="nearest"
    )
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    ax.set_xlabel("component")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=value)
    if annotate if annotate is not None else data.size <= 200:
        vmax = np.nanmax(data) if data.size else 0
        for (r, c), v in np.ndenumerate(data):
            if v:
                ax.text(
                    c,
                    r,
                    f"{v:.3g}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if v > 0.6 * vmax else "white",
                )
    return fig


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and its 95% bootstrap CI (``esa.stats.bootstrap_ci``)."""
    mean = float(values.mean())
    if values.size < 2:
        return mean, mean, mean
    low, high = bootstrap_ci(values, stat=np.mean, confidence=0.95, n_resamples=2000, seed=0)
    return mean, float(low), float(high)


def plot_delta_ppl_bars(
    conditions: Mapping[str, list],
    title: str = "Δ perplexity",
    *,
    ylabel: str = "Δ perplexity",
    log: bool | None = None,
) -> Figure:
    """Mean bar per condition with a 95% CI error bar; non-finite values are dropped and counted.

    `log=None` picks a log y axis when all means are positive and span more than 100x.
    """
    names = list(conditions)
    stats = []
    for name in names:
        v = _numpy(conditions[name])
        ok = v[np.isfinite(v)]
        stats.append((*(_mean_ci(ok) if ok.size else (math.nan,) * 3), v.size - ok.size, ok.size))
    fig, ax = figure(max(5.0, 1.5 + 1.1 * len(names)), 4.2)
    means = np.array([s[0] for s in stats])
    lows = np.array([s[1] for s in stats])
    highs = np.array([s[2] for s in stats])
    x = np.arange(len(names))
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(names))]
    err = np.nan_to_num(np.vstack([means - lows, highs - means]).clip(min=0))
    ax.bar(
        x,
        np.nan_to_num(means),
        color=colors,
        alpha=0.85,
        yerr=err,
        capsize=4,
        error_kw={"ecolor": "#24292f", "lw": 1},
    )
    for i, (m, _lo, hi, bad, n) in enumerate(stats):
        note = f"{m:.3g}" if math.isfinite(m) else "n/a"
        note += f"\nn={n}" + (f", {bad} non-finite" if bad else "")
        top = max(v for v in (m, hi, 0.0) if math.isfinite(v)) if math.isfinite(m) else 0.0
        ax.annotate(
            note, (i, top), textcoords="offset points", xytext=(0, 4), ha="center", va="bottom", fontsize=8
        )
    finite = means[np.isfinite(means)]
    if log is None:
        log = bool(finite.size) and finite.min() > 0 and finite.max() / finite.min() > 100
    if log:
        ax.set_yscale("log")
    else:
        ax.axhline(0, color="#24292f", lw=0.8)
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.15)
    return fig


def plot_dose_response(
    scales,
    series: Mapping[str, list],
    title: str = "dose response",
    *,
    xlabel: str = "scale",
    ylabel: str = "perplexity",
    ylog: bool = False,
) -> Figure:
    """One line per series over `scales` on a log x axis (symlog when a scale is <= 0)."""
    x = _numpy(scales)
    fig, ax = figure()
    for i, (name, ys) in enumerate(series.items()):
        y = _numpy(ys)
        if y.size != x.size:
            raise ValueError(f"series {name!r} has {y.size} values for {x.size} scales")
        ax.plot(x, y, marker="o", ms=4, lw=1.5, color=_COLORS[i % len(_COLORS)], label=str(name))
    positive = x[np.isfinite(x) & (x > 0)]
    if x.size and (x <= 0).any():
        ax.set_xscale("symlog", linthresh=symlog_threshold(positive))
    elif x.size:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=9)
    return fig


def _close(fig) -> None:
    plt = sys.modules.get("matplotlib.pyplot")  # only figures made through pyplot are tracked
    if plt is not None:
        plt.close(fig)


def render(fig, formats=("png",), dpi: int = 100) -> dict[str, bytes]:
    """`fig` rendered in each of `formats` as {format: bytes}; closes `fig`. The first format is
    the one asked for (its error propagates); a later one that fails (a side job: the PDF/SVG
    copies) is left out with a warning."""
    out: dict[str, bytes] = {}
    try:
        if fig.canvas is None or not hasattr(fig.canvas, "print_png"):
            FigureCanvasAgg(fig)
        for i, fmt in enumerate(dict.fromkeys(formats)):
            buf = io.BytesIO()
            try:
                fig.savefig(buf, format=fmt, dpi=dpi)
            except Exception as exc:
                if i == 0:
                    raise
                warnings.warn(f"esa: figure not rendered as {fmt}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            out[fmt] = buf.getvalue()
    finally:
        _close(fig)
    return out


def figure_to_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of `fig` (which is then closed)."""
    return render(fig, ("png",), dpi)["png"]


def figure_to_base64(fig, dpi: int = 100) -> str:
    """Base64 (ASCII) of the PNG of `fig`, for ``data:image/png;base64,...``; closes `fig`."""
    return base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")


def save_figure(fig, path, dpi: int = 150, also=()) -> Path:
    """Write `fig` to `path` (format from the suffix, default png) and a copy in each format of
    `also` next to it (same stem; ``also=VECTOR_FORMATS``: PDF and SVG for papers, each about as
    slow as the PNG); atomic writes, files 0666 & ~umask; closes `fig`. A copy that cannot be
    rendered or written only warns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    data = render(fig, (fmt, *also), dpi)
    atomic_write(path, data.pop(fmt))
    for extra, blob in data.items():
        try:
            atomic_write(path.with_suffix(f".{extra}"), blob)
        except OSError as exc:
            warnings.warn(f"esa: figure copy {extra} not written: {exc}", RuntimeWarning, stacklevel=2)
    return path
