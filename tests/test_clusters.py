"""Tests for esa.analyses.clusters: records of a selection, KMeans/DBSCAN clusters of the critical
weights and what characterises them, Spearman correlation between metrics, the plot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.analyses.clusters import (
    cluster_topk,
    correlation_matrix,
    features,
    metric_correlation,
    plot_clusters,
    records_from_selection,
)
from esa.errors import ConfigError
from esa.models import load_model
from esa.select import select

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama", dtype="fp32", device="cpu")


def _magnitude(lm):
    return {n: p.detach().abs() for n, p in lm.model.named_parameters() if n in lm.param_map.scorable()}


def _blobs(n_per: int = 12, seed: int = 0, outlier: bool = False) -> pd.DataFrame:
    """Two well separated groups: early attn_q weights with small scores, late mlp_down weights
    with large scores in one column."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_per):
        rows.append(
            (
                "a",
                0,
                "attn_q",
                int(rng.integers(0, 64)),
                int(rng.integers(0, 64)),
                10 ** rng.normal(-6, 0.1),
                0.01,
            )
        )
        rows.append(("b", 3, "mlp_down", int(rng.integers(0, 64)), 17, 10 ** rng.normal(2, 0.1), 3.0))
    if outlier:
        rows.append(("c", 1, "attn_v", 0, 0, 1e9, 1e3))
    df = pd.DataFrame(rows, columns=["tensor", "layer", "component", "row", "col", "score", "magnitude"])
    df["depth"] = (df["layer"] + 1) / 5
    df["row_pos"], df["col_pos"] = df["row"] / 63, df["col"] / 63
    return df


def test_records_locate_each_weight_with_its_magnitude_and_position(lm):
    scores = _magnitude(lm)
    sel = select(scores, 3, kind="top", mode="per_layer", metric="magnitude")
    other = {n: -s for n, s in scores.items()}
    df = records_from_selection(lm, sel, {"magnitude": scores, "negated": other})
    assert len(df) == sel.size
    params = dict(lm.model.named_parameters())
    for row in df.itertuples():
        w = float(params[row.tensor].detach().reshape(-1)[row.flat_index])
        assert row.magnitude == pytest.approx(abs(w))
        assert row.score_magnitude == pytest.approx(row.score) and row.score_negated == pytest.approx(
            -row.score
        )
        assert 0.0 <= row.depth <= 1.0 and 0.0 <= row.row_pos <= 1.0 and 0.0 <= row.col_pos <= 1.0
    layers = lm.param_map.num_layers()
    assert set(df["depth"]) <= {(la + 1) / (layers + 1) for la in range(layers)}
    plain = records_from_selection(lm, sel, scores)  # a plain score dict is the selection's own metric
    assert np.allclose(plain["score_magnitude"], plain["score"])


def test_records_need_the_selections_tensors(lm):
    sel = select(_magnitude(lm), 2, kind="top")
    with pytest.raises(ConfigError, match="no tensor"):
        records_from_selection(lm, sel, {"other": {"nope": torch.zeros(1)}})


def test_kmeans_recovers_two_separated_groups_and_describes_them():
    df = _blobs()
    res = cluster_topk(df, "kmeans", 2, seed=0)
    labels = np.array(res["labels"])
    assert res["n_clusters"] == 2 and res["n_noise"] == 0 and len(labels) == len(df)
    assert (
        len(set(labels[df["component"] == "attn_q"])) == 1
        and len(set(labels[df["component"] == "mlp_down"])) == 1
    )
    assert labels[0] != labels[1]
    late = next(c for c in res["clusters"] if c["dominant_component"] == "mlp_down")
    assert late["dominant_component_share"] == 1.0 and late["layer_min"] == late["layer_max"] == 3
    assert late["dominant_col"] == 17 and late["dominant_col_share"] == 1.0
    assert late["size"] == 12 and late["share"] == 0.5 and "mlp_down" in late["description"]
    assert res["silhouette"] is not None and 0.0 < res["silhouette"] <= 1.0
    assert "component=attn_q" in res["features"]
    assert cluster_topk(df, "kmeans", 2, seed=0)["labels"] == res["labels"]  # seeded


def test_kmeans_never_asks_for_more_clusters_than_distinct_points():
    df = pd.concat([_blobs(n_per=1)] * 3, ignore_index=True)  # 2 distinct points, 6 rows
    res = cluster_topk(df, "kmeans", 5, seed=1)
    assert res["n_clusters"] == 2 and res["params"]["n_clusters"] == 2


def test_dbscan_finds_the_groups_and_marks_the_outlier_as_noise():
    df = _blobs(outlier=True)
    res = cluster_topk(df, "dbscan", 2, seed=0)
    labels = res["labels"]
    assert res["n_clusters"] == 2 and labels[-1] == -1 and res["n_noise"] >= 1
    noise = [c for c in res["clusters"] if c["noise"]]
    assert len(noise) == 1 and noise[0]["label"] == -1 and noise[0]["components"]["attn_v"] == 1
    for c in res["clusters"]:
        assert c["noise"] or c["dominant_component_share"] == 1.0  # each cluster is one group
    assert res["params"]["eps"] > 0
    tight = cluster_topk(df, "dbscan", 2, eps=1e-6, min_samples=2)
    assert tight["n_noise"] == len(df) and tight["silhouette"] is None  # nothing is that close


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.sampled_from(["kmeans", "dbscan"]), st.integers(0, 99))
def test_cluster_summary_is_consistent(n, k, method, seed):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "tensor": rng.choice(["x", "y", "z"], n),
            "layer": rng.integers(-1, 4, n),
            "component": rng.choice(["attn_q", "mlp_up", "embed"], n),
            "row": rng.integers(0, 32, n),
            "col": rng.integers(0, 32, n),
            "score": rng.lognormal(0, 3, n),
            "magnitude": rng.lognormal(-2, 1, n),
        }
    )
    res = cluster_topk(df, method, k, seed=seed)
    assert len(res["labels"]) == n and sum(c["size"] for c in res["clusters"]) == n
    assert math.isclose(sum(c["share"] for c in res["clusters"]), 1.0)
    assert res["n_clusters"] == len({v for v in res["labels"] if v != -1})
    assert res["n_clusters"] <= (k if method == "kmeans" else n)
    assert res["silhouette"] is None or -1.0 <= res["silhouette"] <= 1.0
    assert features(df)[0].shape == (n, len(res["features"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "spectral"}, "kmeans or dbscan"),
        ({"n_clusters": 0}, "positive integer"),
        ({"n_clusters": 2.5}, "positive integer"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cluster_topk(_blobs(), **{"method": "kmeans", "n_clusters": 2, **kwargs})


def test_too_few_records_and_missing_columns():
    with pytest.raises(ConfigError, match="at least 2"):
        cluster_topk(_blobs().iloc[:1], "kmeans", 2)
    with pytest.raises(ConfigError, match="magnitude"):
        cluster_topk(_blobs().drop(columns="magnitude"), "kmeans", 2)


def test_metric_correlation_is_spearman_on_the_selected_weights():
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.rand(8, 8, generator=gen), "v": torch.rand(5, generator=gen)}
    sel = select(a, 4, kind="top", mode="per_layer")
    monotone = {n: s.exp() * 3 for n, s in a.items()}
    reversed_ = {n: -s for n, s in a.items()}
    assert metric_correlation(a, monotone, sel)["rho"] == pytest.approx(1.0)
    res = metric_correlation(a, reversed_, sel)
    assert res["rho"] == pytest.approx(-1.0) and res["n"] == 8 and res["n_dropped"] == 0
    holes = {n: s.clone() for n, s in a.items()}
    holes["w"].view(-1)[sel.indices["w"][0]] = float("nan")
    assert metric_correlation(a, holes, sel)["n_dropped"] == 1
    matrix = correlation_matrix({"a": a, "up": monotone, "down": reversed_}, sel)
    rho = np.array(matrix["rho"])
    assert np.allclose(rho, rho.T) and np.allclose(np.diag(rho), 1.0) and rho[1, 2] == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="no tensor"):
        metric_correlation(a, {"w": a["w"]}, sel)


def test_plot_clusters_draws_each_cluster():
    df = _blobs(outlier=True)
    res = cluster_topk(df, "dbscan", 2)
    fig = plot_clusters(df, res)
    assert len(fig.axes[0].collections) == res["n_clusters"] + (1 if res["n_noise"] else 0)
