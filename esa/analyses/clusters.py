"""Weight analysis: cluster the critical weights and correlate metrics on them.

``records_from_selection`` builds one row per selected weight: tensor, flat_index, layer (−1
outside the decoder layers), component, expert, row, col, score, magnitude = |w|, and the
position features depth = (layer + 1) / (L + 1) (embeddings 0, other layer-less tensors 1; L
decoder layers), row_pos = row / (rows − 1), col_pos = col / (cols − 1) (0 for a single
row/column), plus ``score_<metric>`` columns for other metrics' scores on the same weights.

``cluster_topk`` clusters the rows with scikit-learn (``pip install 'esa[cluster]'``) on
standardized features (``StandardScaler``: zero mean, unit variance per column): depth, row_pos,
col_pos, log10 |score|, log10 |w| and a one-hot column per component. ``kmeans``: ``KMeans``
(n_init 10, ``random_state`` = seed) with min(n_clusters, distinct points) clusters. ``dbscan``:
``DBSCAN`` with min_samples = min(5, n) and, unless given, eps = the 90th percentile of the
distances of the points to their min_samples-th nearest neighbour (itself counted; a point far
from every dense region stays noise, label −1). The silhouette
(``silhouette_score``, noise left out) is reported where defined (2 ≤ clusters ≤ points − 1).
Each cluster is characterised by its size, dominant component, layer range, most common input
column (super weights of one model tend to share the massive-activation channel), mean score and
magnitude. Log features floor |x| at the smallest positive |x| of the column (1e-30 if none).

``metric_correlation`` is the Spearman rank correlation (``scipy.stats.spearmanr`` via
``esa.stats.spearman_monotonic``) between two metrics' scores at the selected weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from esa.analyses.components import located_frame
from esa.errors import ConfigError
from esa.plots import figure
from esa.stats import spearman_monotonic

METHODS = ("kmeans", "dbscan")
NUMERIC = ("depth", "row_pos", "col_pos", "log_score", "log_magnitude")
REQUIRED = ("tensor", "layer", "component", "row", "col", "score", "magnitude")
_FLOOR = 1e-30
EPS_QUANTILE = 0.9  # DBSCAN eps: this quantile of the k-nearest-neighbour distances


def records_from_selection(lm, selection, scores=None) -> pd.DataFrame:
    """One row per weight of ``selection`` on ``lm`` (columns in the module doc).

    ``scores``: other metrics' scores on the same weights, ``{metric: {tensor: scores}}`` (a
    plain ``{tensor: scores}`` counts as the selection's own metric); each becomes a column
    ``score_<metric>``."""
    df = located_frame(selection.to_frame(lm.param_map), lm.param_map)
    params = dict(lm.model.named_parameters())
    df["magnitude"] = np.abs(_gather(params, df, "the model's parameters"))
    n_layers = lm.param_map.num_layers()
    none_depth = np.where(df["component"] == "embed", 0.0, 1.0)
    df["depth"] = np.where(df["layer"] >= 0, (df["layer"] + 1) / (n_layers + 1), none_depth)
    shapes = [lm.param_map[t].shape for t in df["tensor"]]
    rows = np.array([s[-2] if len(s) >= 2 else s[0] for s in shapes], dtype=np.float64)
    cols = np.array([s[-1] if len(s) >= 2 else 1 for s in shapes], dtype=np.float64)
    df["row_pos"] = _position(df["row"].to_numpy(np.float64), rows)
    df["col_pos"] = _position(df["col"].to_numpy(np.float64), cols)
    for metric, metric_scores in _score_sets(scores, selection.metric).items():
        df[f"score_{metric}"] = _gather(metric_scores, df, f"scores of {metric!r}")
    return df


def _score_sets(scores, metric: str) -> dict[str, Mapping[str, torch.Tensor]]:
    if scores is None:
        return {}
    if all(isinstance(v, torch.Tensor) for v in scores.values()):
        return {metric or "score": scores}
    return dict(scores)


def _gather(tensors: Mapping[str, torch.Tensor], df: pd.DataFrame, what: str) -> np.ndarray:
    """``tensors[name].reshape(-1)[flat_index]`` per row of ``df`` (float64)."""
    out = np.empty(len(df), dtype=np.float64)
    for name, where in df.groupby("tensor", sort=False).indices.items():
        if name not in tensors:
            raise ConfigError(f"{what} have no tensor {name!r}: pass scores of the selection's tensors")
        flat = torch.as_tensor(df["flat_index"].to_numpy()[where], dtype=torch.long)
        t = tensors[name].detach()
        out[where] = t.reshape(-1)[flat.to(t.device)].double().cpu().numpy()
    return out


def _position(index: np.ndarray, size: np.ndarray) -> np.ndarray:
    return np.where(size > 1, index / np.maximum(size - 1, 1), 0.0)


def _log_floor(x: np.ndarray) -> np.ndarray:
    a = np.abs(np.asarray(x, dtype=np.float64))
    positive = a[np.isfinite(a) & (a > 0)]
    floor = float(positive.min()) if positive.size else _FLOOR
    return np.log10(np.where(np.isfinite(a) & (a > 0), a, floor))


def features(records: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The (unstandardized) feature matrix and its column names (module doc)."""
    missing = [c for c in REQUIRED if c not in records.columns]
    if missing:
        raise ConfigError(f"records lack columns {missing}: build them with records_from_selection")
    df = records
    depth = df["depth"] if "depth" in df.columns else _rank01(df["layer"])
    row_pos = df["row_pos"] if "row_pos" in df.columns else _rank01(df["row"])
    col_pos = df["col_pos"] if "col_pos" in df.columns else _rank01(df["col"])
    cols = [
        np.asarray(depth, dtype=np.float64),
        np.asarray(row_pos, dtype=np.float64),
        np.asarray(col_pos, dtype=np.float64),
        _log_floor(df["score"].to_numpy()),
        _log_floor(df["magnitude"].to_numpy()),
    ]
    components = sorted(df["component"].astype(str).unique())
    cols += [(df["component"].astype(str) == c).to_numpy(np.float64) for c in components]
    return np.column_stack(cols), [*NUMERIC, *(f"component={c}" for c in components)]


def _rank01(values: pd.Series) -> np.ndarray:
    """x / max(x) (0 where max is 0): a fallback position for records without position columns."""
    x = values.fillna(0).to_numpy(np.float64)
    top = float(np.max(x)) if x.size else 0.0
    return x / top if top > 0 else np.zeros_like(x)


def cluster_topk(
    records: pd.DataFrame,
    method: str = "kmeans",
    n_clusters: int = 4,
    seed: int = 0,
    *,
    eps: float | None = None,
    min_samples: int | None = None,
) -> dict:
    """Cluster ``records`` (one row per weight) with KMeans or DBSCAN (module doc).

    Returns plain values: method, n_samples, n_clusters (found, noise excluded), n_noise,
    silhouette (None where undefined), features, labels (one per record, −1 = noise), clusters
    (per label: size, share, dominant_component(_share), components, layer_min/max/mean,
    n_tensors, dominant_col(_share), mean_score, median_score, mean_magnitude, max_magnitude,
    description) and params (what the estimator used)."""
    if method not in METHODS:
        raise ConfigError(f"unknown clustering method {method!r}: use kmeans or dbscan")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ConfigError(f"n_clusters must be a positive integer, got {n_clusters!r}; pass e.g. 4")
    if len(records) < 2:
        raise ConfigError(f"{len(records)} weight(s) to cluster: select at least 2 (raise --topk)")
    cluster, preprocessing, metrics, neighbors = _sklearn()
    raw, names = features(records)
    x = preprocessing.StandardScaler().fit_transform(raw)
    if method == "kmeans":
        k = min(n_clusters, len(np.unique(x, axis=0)))
        labels = cluster.KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        params: dict[str, float] = {"n_clusters": int(k), "n_init": 10, "random_state": int(seed)}
    else:
        m = min(min_samples or 5, len(x))
        eps = float(eps) if eps is not None else _kdist_eps(neighbors, x, m)
        labels = cluster.DBSCAN(eps=eps, min_samples=m).fit_predict(x)
        params = {"eps": eps, "min_samples": int(m)}
    labels = np.asarray(labels, dtype=np.int64)
    found = sorted(int(v) for v in set(labels.tolist()) - {-1})
    return {
        "method": method,
        "seed": int(seed),
        "n_samples": len(records),
        "n_clusters": len(found),
        "n_noise": int((labels == -1).sum()),
        "silhouette": _silhouette(metrics, x, labels, seed),
        "features": names,
        "labels": labels.tolist(),
        "clusters": [_describe(records, labels == lab, lab) for lab in [*found, -1] if (labels == lab).any()],
        "params": params,
    }


def _sklearn():
    try:
        from sklearn import cluster, metrics, neighbors, preprocessing
    except ImportError:
        raise ConfigError("clustering needs scikit-learn: pip install 'esa[cluster]'") from None
    return cluster, preprocessing, metrics, neighbors


def _kdist_eps(neighbors, x: np.ndarray, m: int) -> float:
    """90th percentile of the distance to the m-th nearest neighbour (the point itself is the
    first); at least 1e-9."""
    dist, _ = neighbors.NearestNeighbors(n_neighbors=m).fit(x).kneighbors(x)
    return max(float(np.quantile(dist[:, -1], EPS_QUANTILE)), 1e-9)


def _silhouette(metrics, x: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    keep = labels != -1
    n_labels = len(set(labels[keep].tolist()))
    if not 2 <= n_labels <= int(keep.sum()) - 1:
        return None
    return float(metrics.silhouette_score(x[keep], labels[keep], random_state=seed))


def _describe(records: pd.DataFrame, mask: np.ndarray, label: int) -> dict:
    part = records[mask]
    comps = Counter(part["component"].astype(str))
    comp, comp_n = comps.most_common(1)[0]
    col, col_n = Counter(part["col"].astype(int)).most_common(1)[0]
    layers = part["layer"][part["layer"] >= 0]
    score, mag = part["score"].astype(float), part["magnitude"].astype(float)
    out = {
        "label": int(label),
        "noise": label == -1,
        "size": len(part),
        "share": len(part) / len(records),
        "dominant_component": comp,
        "dominant_component_share": comp_n / len(part),
        "components": {k: int(v) for k, v in comps.most_common()},
        "layer_min": int(layers.min()) if len(layers) else None,
        "layer_max": int(layers.max()) if len(layers) else None,
        "layer_mean": float(layers.mean()) if len(layers) else None,
        "n_tensors": int(part["tensor"].nunique()),
        "dominant_col": int(col),
        "dominant_col_share": col_n / len(part),
        "mean_score": float(score.mean()),
        "median_score": float(score.median()),
        "mean_magnitude": float(mag.mean()),
        "max_magnitude": float(mag.max()),
    }
    span = "no layer" if out["layer_min"] is None else f"layers {out['layer_min']}-{out['layer_max']}"
    out["description"] = (
        f"{'noise' if label == -1 else f'cluster {label}'}: {out['size']} weights, "
        f"{100 * out['dominant_component_share']:.0f}% {comp}, {span}, "
        f"col {col} in {100 * out['dominant_col_share']:.0f}%, mean score {out['mean_score']:.3g}"
    )
    return out


def metric_correlation(
    scores_a: Mapping[str, torch.Tensor], scores_b: Mapping[str, torch.Tensor], selection
) -> dict:
    """Spearman rank correlation of two metrics' scores at the entries of ``selection``.

    Pairs where either score is not finite are dropped. Returns rho, pvalue (NaN with fewer than 2
    pairs or constant scores), n (pairs used), n_dropped."""
    frame = pd.DataFrame(
        [(n, int(i)) for n, idx in selection.indices.items() for i in idx.tolist()],
        columns=["tensor", "flat_index"],
    )
    a = _gather(scores_a, frame, "scores_a") if len(frame) else np.empty(0)
    b = _gather(scores_b, frame, "scores_b") if len(frame) else np.empty(0)
    ok = np.isfinite(a) & np.isfinite(b)
    res = spearman_monotonic(a[ok], b[ok])
    return {"rho": res["rho"], "pvalue": res["pvalue"], "n": res["n"], "n_dropped": int((~ok).sum())}


def correlation_matrix(score_sets: Mapping[str, Mapping[str, torch.Tensor]], selection) -> dict:
    """Pairwise ``metric_correlation`` rho of several metrics (``{metric: scores}``) at the
    selection's entries: ``{"metrics": [...], "rho": [[...]], "n": pairs of the first two}``."""
    names = list(score_sets)
    rho = [[1.0 if a == b else 0.0 for b in names] for a in names]
    n = 0
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            res = metric_correlation(score_sets[a], score_sets[names[j]], selection)
            rho[i][j] = rho[j][i] = res["rho"]
            n = n or res["n"]
    return {"metrics": names, "rho": rho, "n": n}


def plot_clusters(records: pd.DataFrame, result: Mapping, title: str = "critical-weight clusters"):
    """Layer depth (x) against log10 |score| (y), one colour per cluster (noise grey x)."""
    fig, ax = figure()
    labels = np.asarray(result["labels"])
    x = records["depth"].to_numpy(np.float64) if "depth" in records else _rank01(records["layer"])
    y = _log_floor(records["score"].to_numpy())
    for lab in sorted(set(labels.tolist())):
        sel = labels == lab
        if lab == -1:
            ax.scatter(x[sel], y[sel], marker="x", color="#8c959f", s=18, label=f"noise ({sel.sum()})")
        else:
            ax.scatter(x[sel], y[sel], s=18, alpha=0.8, label=f"cluster {lab} ({sel.sum()})")
    ax.set_xlabel("layer depth (layer + 1) / (L + 1)")
    ax.set_ylabel("log10 |score|")
    sil = result.get("silhouette")
    ax.set_title(f"{title} ({result['method']}" + (f", silhouette {sil:.2f})" if sil is not None else ")"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
