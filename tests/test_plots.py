"""esa.plots: every function returns a Figure that renders to PNG; sampling, CI and atomic saves."""

from __future__ import annotations

import base64
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from esa import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _png(fig) -> bytes:
    assert isinstance(fig, Figure)
    data = base64.b64decode(plots.figure_to_base64(fig))
    assert data.startswith(PNG)
    return data


def test_score_distribution_dict_and_array() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(300, 200, generator=g) ** 4, "b": torch.zeros(7), "c": torch.tensor([math.nan])}
    fig = plots.plot_score_distribution(scores, "scores")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and ax.get_title() == "scores"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("n=60,008" in t for t in labels) and any("zeros=7 non-finite=1" in t for t in labels)
    _png(fig)
    _png(plots.plot_score_distribution(-np.random.default_rng(0).random(500), "negative ok"))
    _png(plots.plot_score_distribution(np.zeros(5), "all zero"))


def test_sampling_is_bounded_and_seeded() -> None:
    scores = {"a": torch.arange(1, 50_001, dtype=torch.float32), "b": np.arange(1, 25_001, dtype=np.float32)}
    v1, total = plots._sample(scores, max_points=3_000, seed=0)
    v2, _ = plots._sample(scores, max_points=3_000, seed=0)
    assert total == 75_000 and 3_000 <= v1.size <= 3_002 and np.array_equal(v1, v2)
    v3, _ = plots._sample(scores, max_points=3_000, seed=1)
    assert not np.array_equal(v1, v3)
    fig = plots.plot_score_distribution(scores, max_points=3_000)
    assert any("sample" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    plots.figure_to_base64(fig)


def test_layer_component_heatmap() -> None:
    df = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1, 1, 3],
            "component": ["q", "k", "q", "q", "down", "down"],
            "score": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    )
    fig = plots.plot_layer_component_heatmap(df, title="counts")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 3) and image.sum() == 6 and image.max() == 2
    fig2 = plots.plot_layer_component_heatmap(df, value="score", title="scores")
    assert fig2.axes[0].images[0].get_array().sum() == pytest.approx(21.0)
    _png(fig)
    _png(fig2)
    with pytest.raises(ValueError, match="layer"):
        plots.plot_layer_component_heatmap(pd.DataFrame({"x": [1]}))


def test_delta_ppl_bars_ci() -> None:
    fig = plots.plot_delta_ppl_bars(
        {"top": [100.0, 120.0, 140.0, math.inf], "random": [0.1, 0.3, 0.2], "single": [0.5]}, "delta"
    )
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([120.0, 0.2, 0.5])
    assert ax.get_yscale() == "log"  # means span > 100x
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "n=3, 1 non-finite" in texts and "n=1" in texts
    _png(fig)
    mean, low, high = plots._mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and low < mean < high
    lin = plots.plot_delta_ppl_bars({"a": [-1.0, 1.0], "b": [2.0, 2.5]}, "signed")
    assert lin.axes[0].get_yscale() == "linear"
    _png(lin)


def test_dose_response() -> None:
    series = {"top": [10, 20, 40, 80], "random": [10, 10, 10, 11]}
    fig = plots.plot_dose_response([0.5, 1, 2, 4], series, "dose")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.lines) == 2
    _png(fig)
    zero = plots.plot_dose_response([0, 1, 10], {"a": [1, 2, 3]}, "with zero", ylog=True)
    assert zero.axes[0].get_xscale() == "symlog" and zero.axes[0].get_yscale() == "log"
    _png(zero)
    with pytest.raises(ValueError, match="3 scales"):
        plots.plot_dose_response([1, 2, 3], {"a": [1, 2]})


def test_save_figure_atomic_and_pyplot_closed(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = plots.save_figure(plots.plot_dose_response([1, 2], {"a": [1, 2]}), tmp_path / "sub" / "d.png")
    assert path.read_bytes().startswith(PNG) and not list(path.parent.glob(".*.tmp"))
    assert (
        plots.save_figure(plots.plot_dose_response([1, 2], {"a": [1, 2]}), tmp_path / "d.svg")
        .read_text()
        .lstrip()
        .startswith("<?xml")
    )
    fig = plt.figure()
    fig.add_subplot().plot([1, 2])
    assert plt.fignum_exists(fig.number)
    _png(fig)
    assert not plt.fignum_exists(fig.number)
