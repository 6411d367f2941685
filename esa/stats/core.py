"""Set overlaps, classical tests, bootstrap CIs and power-law fits: thin wrappers over scipy/numpy
returning plain Python numbers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from scipy import stats as _st

from esa.errors import ConfigError

NAN = float("nan")


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A∩B| / |A∪B|; 1.0 when both sets are empty."""
    a, b = set(a), set(b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def overlap(a: Iterable, b: Iterable) -> float:
    """|A∩B| / min(|A|, |B|); 1.0 when both are empty, 0.0 when only one is."""
    a, b = set(a), set(b)
    if not a and not b:
        return 1.0
    small = min(len(a), len(b))
    return 0.0 if small == 0 else len(a & b) / small


def paired_ttest(a, b, alternative: str = "two-sided") -> dict:
    """Paired t-test (``scipy.stats.ttest_rel``): statistic, pvalue, n, mean_diff.

    ``alternative`` is scipy's: "two-sided", "greater" (mean of a - b > 0) or "less".

    n < 2 gives NaN statistic and pvalue. Zero variance of the differences gives statistic 0 and
    pvalue 1 when all differences are 0, else statistic ±inf and pvalue 0.
    """
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ConfigError(f"paired_ttest needs equal lengths, got {a.size} and {b.size}; pair the runs")
    diff = a - b
    n = int(a.size)
    mean_diff = float(np.mean(diff)) if n else NAN
    if n < 2:
        return {"statistic": NAN, "pvalue": NAN, "n": n, "mean_diff": mean_diff}
    if np.all(np.isfinite(diff)) and np.ptp(diff) == 0:
        out = {**_degenerate(mean_diff), "n": n, "mean_diff": mean_diff}
        if alternative != "two-sided" and mean_diff != 0:
            agrees = (mean_diff > 0) == (alternative == "greater")
            out["pvalue"] = 0.0 if agrees else 1.0
        return out
    res = _quiet(_st.ttest_rel, a, b, alternative=alternative)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue), "n": n, "mean_diff": mean_diff}


def welch_ttest(a, b) -> dict:
    """Welch's t-test (``ttest_ind(equal_var=False)``): statistic, pvalue, n, n_a, n_b, mean_diff.

    Either sample with n < 2 gives NaN. Both samples constant: statistic 0 / pvalue 1 when the
    means are equal, else ±inf / 0.
    """
    a, b = _array(a), _array(b)
    n_a, n_b = int(a.size), int(b.size)
    mean_diff = float(np.mean(a) - np.mean(b)) if n_a and n_b else NAN
    out = {"n": n_a + n_b, "n_a": n_a, "n_b": n_b, "mean_diff": mean_diff}
    if n_a < 2 or n_b < 2:
        return {"statistic": NAN, "pvalue": NAN, **out}
    finite = np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    if finite and np.ptp(a) == 0 and np.ptp(b) == 0:
        return {**_degenerate(mean_diff), **out}
    res = _quiet(_st.ttest_ind, a, b, equal_var=False)
    return {"statistic": float(res.statistic), "pvalue": float(res.pvalue), **out}


def bootstrap_ci(
    values,
    stat: Callable = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``stat`` (``scipy.stats.bootstrap``, BCa).

    Empty input gives (nan, nan); one value or constant data gives (v, v) with v = stat(values).
    Falls back to the percentile method when BCa is undefined.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}; pass e.g. 0.95")
    x = _array(values)
    if x.size == 0:
        return (NAN, NAN)
    if x.size == 1 or (np.all(np.isfinite(x)) and np.ptp(x) == 0):
        v = float(stat(x))
        return (v, v)
    for method in ("BCa", "percentile"):
        res = _quiet(
            _st.bootstrap,
            (x,),
            stat,
            n_resamples=int(n_resamples),
            confidence_level=confidence,
            method=method,
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            break
    return (low, high)


def effect_ratio(numerator, denominator) -> float:
    """mean(numerator) / mean(denominator); ±inf when the denominator mean is 0 (nan if both).

    Not evidence for an "A ≥ N× B" claim (a ratio of two non-positive means looks large): use
    ``esa.stats.dominance``.
    """
    num, den = float(np.mean(_array(numerator))), float(np.mean(_array(denominator)))
    if den == 0.0:
        if num == 0.0 or math.isnan(num):
            return NAN
        return math.copysign(math.inf, num)
    return num / den


def spearman_monotonic(x, y) -> dict:
    """Spearman rank correlation (``scipy.stats.spearmanr``): rho, pvalue, n, strictly_increasing.

    ``strictly_increasing`` is True when y strictly increases with x (x sorted, no ties in x).
    """
    x, y = _array(x), _array(y)
    if x.shape != y.shape:
        raise ConfigError(f"spearman_monotonic needs equal lengths, got {x.size} and {y.size}")
    n = int(x.size)
    if n < 2:
        return {"rho": NAN, "pvalue": NAN, "n": n, "strictly_increasing": False}
    res = _quiet(_st.spearmanr, x, y)
    order = np.argsort(x, kind="stable")
    increasing = bool(np.all(np.diff(x[order]) > 0) and np.all(np.diff(y[order]) > 0))
    rho, pvalue = float(res.statistic), float(res.pvalue)
    return {"rho": rho, "pvalue": pvalue, "n": n, "strictly_increasing": increasing}


def power_law_fit(x, y, n_boot: int = 1000, seed: int = 0) -> dict:
    """Fit y = prefactor * x**alpha by least squares in log-log space (``linregress``).

    Returns alpha, prefactor, r2, r2_ci (95% percentile bootstrap over points, degenerate
    resamples skipped), alpha_stderr, pvalue, n. Needs >= 3 points, all x and y > 0.
    """
    lx, ly = _log_points(x, y, minimum=3)
    res = _linregress(lx, ly)
    return {
        "alpha": float(res.slope),
        "prefactor": float(math.exp(res.intercept)),
        "r2": float(min(1.0, res.rvalue**2)),
        "r2_ci": _r2_bootstrap(lx, ly, n_boot, seed),
        "alpha_stderr": float(res.stderr),
        "pvalue": float(res.pvalue),
        "n": int(lx.size),
    }


def predict_power_law(fit: dict, x):
    """prefactor * x**alpha for a scalar (float) or a sequence (list of floats)."""
    arr = np.asarray(x, dtype=float)
    pred = float(fit["prefactor"]) * np.power(arr, float(fit["alpha"]))
    return float(pred) if arr.ndim == 0 else [float(v) for v in pred.reshape(-1)]


def leave_one_out_errors(x, y) -> list[float]:
    """Signed relative error (pred - y_i) / y_i of each point predicted by a fit on the others."""
    lx, ly = _log_points(x, y, minimum=3)
    errors = []
    for i in range(lx.size):
        keep = np.arange(lx.size) != i
        res = _linregress(lx[keep], ly[keep])
        pred = math.exp(res.intercept + res.slope * lx[i])
        actual = math.exp(ly[i])
        errors.append(float((pred - actual) / actual))
    return errors


def _array(values) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, dtype=float)).reshape(-1)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _degenerate(mean_diff: float) -> dict:
    if mean_diff == 0.0:
        return {"statistic": 0.0, "pvalue": 1.0}
    return {"statistic": math.copysign(math.inf, mean_diff), "pvalue": 0.0}


def _log_points(x, y, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(x), _array(y)
    if x.shape != y.shape:
        raise ConfigError(f"power-law fit needs equal lengths, got {x.size} x and {y.size} y")
    if x.size < minimum:
        raise ConfigError(f"power-law fit needs at least {minimum} points, got {x.size}; add points")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0) or np.any(y <= 0):
        raise ConfigError("power-law fit needs finite x > 0 and y > 0; drop zero/negative points")
    return np.log(x), np.log(y)


def _linregress(lx: np.ndarray, ly: np.ndarray):
    if np.ptp(lx) == 0:
        raise ConfigError("power-law fit needs at least two distinct x values; vary x")
    return _quiet(_st.linregress, lx, ly)


def _r2(lx: np.ndarray, ly: np.ndarray, axis: int = -1) -> np.ndarray:
    """Squared Pearson correlation along ``axis``; NaN where x or y has no spread."""
    dx = lx - lx.mean(axis=axis, keepdims=True)
    dy = ly - ly.mean(axis=axis, keepdims=True)
    sxx, syy, sxy = (dx * dx).sum(axis), (dy * dy).sum(axis), (dx * dy).sum(axis)
    with np.errstate(all="ignore"):
        r2 = np.clip(sxy * sxy / (sxx * syy), 0.0, 1.0)
    return np.where((sxx > 0) & (syy > 0), r2, np.nan)


def _r2_bootstrap(lx: np.ndarray, ly: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of r^2 over paired resamples of the points (degenerate ones skipped).

    scipy's interval is NaN as soon as one resample is degenerate, so the percentiles are taken
    with ``nanpercentile`` over its bootstrap distribution.
    """
    if n_boot <= 0:
        return (NAN, NAN)
    res = _quiet(
        _st.bootstrap,
        (lx, ly),
        _r2,
        n_resamples=int(n_boot),
        paired=True,
        vectorized=True,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    if not np.any(np.isfinite(dist)):
        return (NAN, NAN)
    low, high = np.nanpercentile(dist, [2.5, 97.5])
    return (float(low), float(high))
