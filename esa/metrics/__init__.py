"""Sensitivity metrics: the registry, the gradient, curvature and activation families, and the
score cache. ``compute_scores(lm, metric, calib)`` -> ``{param name: float32 score tensor}``.

Importing this package registers every built-in metric (each family module registers its own)."""

# each family registers its metrics on import; this order is the listing order (esa metrics)
from esa.metrics import gradient, curvature, activation  # noqa: F401, I001
from esa.metrics.cache import cached_scores
from esa.metrics.registry import METRICS, compute_scores, list_metrics, register_metric, score_summary

__all__ = ["METRICS", "cached_scores", "compute_scores", "list_metrics", "register_metric", "score_summary"]
