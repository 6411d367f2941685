"""Statistics over evaluation windows: the paired window bootstrap of ΔPPL, the dominance rule for
every "A ≥ N× B" claim, a paired signed-rank test on per-window NLL and an empirical p-value.

The unit of resampling is the evaluation window (fixed length, so the mean of per-window mean NLLs
is the corpus mean NLL and exp of it is the perplexity). Seeds are not the sample: a CI over three
seeds says nothing about the text; a CI over W windows does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

from esa.errors import ConfigError
from esa.stats.core import _quiet, bootstrap_ci

ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass(frozen=True)
class WindowBootstrap:
    """Paired bootstrap of ΔPPL over evaluation windows (built by ``window_bootstrap``).

    point: name -> ΔPPL on all windows (float); samples: name -> ΔPPL of each resample, array [R];
    indices: the window indices of every resample [R, W], shared by the base and all conditions;
    base_ppl: exp(mean base NLL); confidence: the CI level.
    """

    point: dict[str, float]
    samples: dict[str, np.ndarray]
    indices: np.ndarray
    base_ppl: float
    confidence: float

    @property
    def n_windows(self) -> int:
        return int(self.indices.shape[1])

    @property
    def n_resamples(self) -> int:
        return int(self.indices.shape[0])

    def ci(self, name: str) -> tuple[float, float]:
        """Percentile CI of the condition's ΔPPL (see ``percentile_ci``)."""
        return percentile_ci(self.samples[name], self.confidence)

    def ratio_samples(self, num: str, den: str) -> np.ndarray:
        """ΔPPL_num / ΔPPL_den per resample (paired: same windows); ±inf or NaN where den is 0."""
        with np.errstate(all="ignore"):
            return self.samples[num] / self.samples[den]

    def difference_samples(self, num: str, den: str) -> np.ndarray:
        """ΔPPL_num − ΔPPL_den per resample (paired: same windows)."""
        with np.errstate(all="ignore"):
            return self.samples[num] - self.samples[den]

    def summary(self) -> dict[str, dict]:
        """name -> {"point": float, "ci": [lo, hi]}, plain Python for reports."""
        return {n: {"point": self.point[n], "ci": list(self.ci(n))} for n in self.point}


def percentile_ci(samples, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval [q_(1−c)/2, q_(1+c)/2] of bootstrap samples, rounded outwards.

    The bounds are sample values (numpy's "lower" / "higher" quantile methods), never an
    interpolation: interpolating towards an infinite sample gives NaN, and outward rounding is the
    conservative choice. Empty samples give (nan, nan); NaN samples propagate.
    """
    x = np.asarray(samples, dtype=float).reshape(-1)
    if x.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - _confidence(confidence)) / 2.0
    lo = np.quantile(x, alpha, method="lower")
    hi = np.quantile(x, 1.0 - alpha, method="higher")
    return (float(lo), float(hi))


def window_bootstrap(
    base_nll,
    conditions: Mapping[str, object],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WindowBootstrap:
    """Paired bootstrap over windows of ΔPPL for every condition against the same base model.

    base_nll: [W] per-window mean NLL of the unperturbed model; conditions: name -> per-window mean
    NLL of a perturbed model, [W] or [S, W] (S seeds on the same W windows). For windows w, seeds s:

        ΔPPL = 1/S Σ_s ( exp(1/W Σ_w nll_cond[s, w]) − exp(1/W Σ_w base_nll[w]) )

    A resample r draws W window indices with replacement, I_r (the [R, W] matrix ``indices``, drawn
    once with ``numpy.random.default_rng(seed)``), and evaluates the same formula on base_nll[I_r]
    and nll_cond[:, I_r] for every condition: the base and all conditions see the same windows, so
    differences and ratios between conditions are paired. Memory is O(S·R·W) per condition.

    A non-finite NLL in any window (an overflowed perturbed model) makes the point ΔPPL inf or NaN;
    it is kept as a float. W = 1 gives resamples that all equal the point (a collapsed CI).
    """
    base = np.asarray(base_nll, dtype=float)
    if base.ndim != 1 or base.size == 0:
        raise ConfigError(f"base_nll must be a non-empty 1-D array [W], got shape {base.shape}")
    if int(n_resamples) < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}")
    confidence = _confidence(confidence)
    w = base.size
    idx = np.random.default_rng(seed).integers(0, w, size=(int(n_resamples), w))
    point, samples = {}, {}
    with np.errstate(all="ignore"):
        base_ppl, base_ppl_r = float(np.exp(base.mean())), np.exp(base[idx].mean(axis=-1))
        for name, nll in conditions.items():
            cond = _seeds_by_windows(nll, w, name)
            point[name] = float(np.mean(np.exp(cond.mean(axis=-1)) - base_ppl))
            samples[name] = np.mean(np.exp(cond[:, idx].mean(axis=-1)) - base_ppl_r, axis=0)
    return WindowBootstrap(point, samples, idx, base_ppl, confidence)


def dominance(boot: WindowBootstrap, num: str, den: str, factor: float) -> dict:
    """The decision rule of every "ΔPPL(num) ≥ factor × ΔPPL(den)" claim, on a paired bootstrap.

    1. Evidence of damage first: holds only if num's ΔPPL CI excludes zero from above (lo > 0).
       "No damage" (CI around 0) and "improvement" (ΔPPL < 0) never hold.
    2. den's point ΔPPL > 0: key "ratio" = ΔPPL_num / ΔPPL_den with the CI of the paired resample
       ratios; holds iff ratio ≥ factor.
       den's point ΔPPL ≤ 0: a ratio would be negative or undefined, and a ratio of non-positive
       quantities is not evidence (−41 or 15.17 from two negative means read as "large"). Key
       "difference" = ΔPPL_num − ΔPPL_den with its paired CI; holds iff its lower bound > 0.
    3. Undecidable, ``decided`` False (the claim is inconclusive, ``holds`` False): a non-finite
       ΔPPL on either side (an overflowed perplexity: inf vs inf is no comparison), a non-finite key
       value, or a single window (no CI over windows).

    Returns plain Python: decided, holds (bools), key, value, ci [lo, hi], num_point, num_ci,
    den_point, den_ci, factor, reason (one line).
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"dominance factor must be finite and > 0, got {factor}")
    num_point, den_point = boot.point[num], boot.point[den]
    is_ratio = den_point > 0
    key = "ratio" if is_ratio else "difference"
    samples = boot.ratio_samples(num, den) if is_ratio else boot.difference_samples(num, den)
    value = num_point / den_point if is_ratio else num_point - den_point
    ci, num_ci = percentile_ci(samples, boot.confidence), boot.ci(num)
    out = {
        "key": key,
        "value": value,
        "ci": list(ci),
        "num_point": num_point,
        "num_ci": list(num_ci),
        "den_point": den_point,
        "den_ci": list(boot.ci(den)),
        "factor": float(factor),
    }
    undecided = _undecided(boot, num, den, value)
    if undecided:
        return {"decided": False, "holds": False, **out, "reason": undecided}
    damaged = num_ci[0] > 0
    passes = value >= factor if is_ratio else ci[0] > 0
    holds = bool(damaged and passes)
    return {"decided": True, "holds": holds, **out, "reason": _reason(num, den, out, damaged, passes)}


def paired_window_test(
    a_nll,
    b_nll,
    alternative: str = "greater",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on per-window NLL differences a − b.

    a_nll, b_nll: [W] or [S, W] per-window mean NLL (seeds are averaged per window first), same W.
    With d_w = mean_s a[s, w] − mean_s b[s, w], "greater" tests H1: d is shifted above 0 (a is the
    worse model). Paired on windows: the text's difficulty cancels, so a shift far below the spread
    of PPL across seeds is detected. Zero differences are dropped (scipy's "wilcox" rule); all zero
    gives p = 1. NaN differences give NaN (inconclusive); inf differences rank highest.

    Returns statistic, p_value, n (windows), mean_diff, ci [lo, hi] (``bootstrap_ci`` of mean d
    over windows).
    """
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    a, b = _per_window(a_nll, "a_nll"), _per_window(b_nll, "b_nll")
    if a.shape != b.shape:
        raise ConfigError(f"paired_window_test needs the same windows, got W={a.size} and W={b.size}")
    with np.errstate(all="ignore"):
        d = a - b
    mean_diff = float(np.mean(d))
    ci = list(bootstrap_ci(d, confidence=confidence, n_resamples=n_resamples, seed=seed))
    out = {"n": int(d.size), "mean_diff": mean_diff, "ci": ci}
    if np.any(np.isnan(d)):
        return {"statistic": math.nan, "p_value": math.nan, **out}
    if not np.any(d):
        return {"statistic": 0.0, "p_value": 1.0, **out}
    res = _quiet(_st.wilcoxon, d, alternative=alternative)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), **out}


def empirical_p_value(observed: float, null, alternative: str = "greater") -> float:
    """Permutation-style p-value of ``observed`` against a null sample of size n.

    greater: (1 + #{null ≥ observed}) / (1 + n); less: (1 + #{null ≤ observed}) / (1 + n);
    two-sided: min(1, 2·min(greater, less)). Always 1/(n+1) ≤ p ≤ 1: n null draws can never give
    p = 0. inf compares as usual (an overflowed observation beats every finite null draw); a NaN
    observation or NaN in the null gives NaN (inconclusive).
    """
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    x, obs = np.asarray(null, dtype=float).reshape(-1), float(observed)
    if math.isnan(obs) or np.any(np.isnan(x)):
        return math.nan
    greater = (1 + int(np.sum(x >= obs))) / (1 + x.size)
    less = (1 + int(np.sum(x <= obs))) / (1 + x.size)
    if alternative == "two-sided":
        return float(min(1.0, 2.0 * min(greater, less)))
    return float(greater if alternative == "greater" else less)


def _confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}; pass e.g. 0.95")
    return float(confidence)


def _seeds_by_windows(nll, w: int, name: str) -> np.ndarray:
    """nll as [S, W] float (a [W] vector is one seed)."""
    x = np.asarray(nll, dtype=float)
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != w or x.shape[0] == 0:
        raise ConfigError(f"condition {name!r} must be [W] or [S, W] with W={w}, got {np.shape(nll)}")
    return x


def _per_window(nll, what: str) -> np.ndarray:
    x = np.asarray(nll, dtype=float)
    if x.ndim not in (1, 2) or x.size == 0:
        raise ConfigError(f"{what} must be a non-empty [W] or [S, W] array, got shape {x.shape}")
    return x if x.ndim == 1 else x.mean(axis=0)


def _undecided(boot: WindowBootstrap, num: str, den: str, value: float) -> str:
    """Why the rule cannot decide, or "" when it can."""
    for name in (num, den):
        if not math.isfinite(boot.point[name]):
            return f"non-finite ΔPPL for {name} ({boot.point[name]}): overflowed perplexity"
    if not math.isfinite(value):
        return f"non-finite key value ({value})"
    if boot.n_windows < 2:
        return "one evaluation window: no confidence interval over windows"
    return ""


def _reason(num: str, den: str, out: dict, damaged: bool, passes: bool) -> str:
    lo, hi = out["num_ci"]
    if not damaged:
        return (
            f"no significant damage: ΔPPL({num}) {out['num_point']:.4g}, CI [{lo:.4g}, {hi:.4g}] not above 0"
        )
    clo, chi = out["ci"]
    if out["key"] == "ratio":
        rel = "≥" if passes else "<"
        return f"ΔPPL({num}) / ΔPPL({den}) = {out['value']:.4g} {rel} {out['factor']:g} (CI [{clo:.4g}, {chi:.4g}])"
    verdict = "above 0" if passes else "not above 0"
    return (
        f"ΔPPL({den}) ≤ 0, so the key is the difference: ΔPPL({num}) − ΔPPL({den}) = "
        f"{out['value']:.4g}, CI [{clo:.4g}, {chi:.4g}] {verdict}"
    )
