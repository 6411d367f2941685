"""Power-law fits of a scaling family and their plot: ``value = prefactor * n_params ** alpha``,
fitted by least squares in log-log space (``esa.stats.power_law_fit``), with leave-one-out
prediction errors (``esa.stats.leave_one_out_errors``) as the out-of-sample check. The points
are ``(n_params, value)`` pairs, e.g. from ``esa.analyses.scaling.measure_family``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from esa import plots
from esa.stats import leave_one_out_errors, power_law_fit, predict_power_law


def fit_scaling(points: Sequence[tuple[float, float]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Fit ``value = prefactor * n_params ** alpha`` to ``points`` ``[(n_params, value), ...]``.

    Returns (plain types) alpha, prefactor, r2, r2_ci (95% bootstrap over points), alpha_stderr,
    pvalue, n (from ``esa.stats.power_law_fit``); x, y (sorted by x); loo_errors (signed relative
    error (pred − y)/y of each point predicted by a fit on the others, in x order) with
    loo_mean_abs and loo_max_abs; and largest_from_others (x, actual, predicted, rel_error): the
    largest model predicted by the fit on all the others. Needs >= 3 points with x, y > 0 finite.
    """
    pts = sorted((float(x), float(y)) for x, y in points)
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    fit = power_law_fit(x, y, n_boot=n_boot, seed=seed)
    loo = leave_one_out_errors(x, y)
    rel = loo[-1]
    return {
        **fit,
        "r2_ci": list(fit["r2_ci"]),
        "x": x,
        "y": y,
        "loo_errors": loo,
        "loo_mean_abs": float(np.mean(np.abs(loo))),
        "loo_max_abs": float(np.max(np.abs(loo))),
        "largest_from_others": {
            "x": x[-1],
            "actual": y[-1],
            "predicted": y[-1] * (1.0 + rel),
            "rel_error": rel,
        },
    }


def plot_scaling(
    points: Sequence[tuple[float, float]],
    fit: dict,
    *,
    labels: Sequence[str] | None = None,
    xlabel: str = "parameters",
    ylabel: str = "measure",
    title: str | None = None,
):
    """Log-log scatter of ``points``, the fitted power law and an α / R² annotation (a Figure)."""
    fig, ax = plots.figure(6.0, 4.2)
    x = np.array([float(p[0]) for p in points])
    y = np.array([float(p[1]) for p in points])
    ax.scatter(x, y, color="#0969da", zorder=3, label="models")
    if labels:
        for xi, yi, lab in zip(x, y, labels):
            ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    grid = np.geomspace(x.min() / 1.2, x.max() * 1.2, 100)
    ax.plot(grid, predict_power_law(fit, grid), color="#cf222e", label="power-law fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ci = fit.get("r2_ci") or (math.nan, math.nan)
    text = f"α = {fit['alpha']:.3f}\nR² = {fit['r2']:.3f}"
    if all(math.isfinite(c) for c in ci):
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    ax.text(
        0.03,
        0.97,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return fig
