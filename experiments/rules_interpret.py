"""Decision rules of the phase-5.3 interpretability claims (super-activation tracing, stop-word shift,
attention sinks): pure functions of a `Claim` and plain arrays (esa.analyses.interpret's output).

As in rules_applications.py each rule measures what it decides on and decides only through the claim
(any decided failure falsifies, else any undecided part is inconclusive, else it holds). CIs are
bootstrap percentile intervals (scipy.stats.bootstrap, 2000 resamples, seed 0, 95 %).
experiments/test_rules_interpret.py feeds every rule synthetic data where it must hold, be falsified
and be inconclusive.
"""

from __future__ import annotations

import math

import numpy as np
from rules_perturbation import _decide as decide
from scipy import stats as sps

from esa import stats
from esa.claims.claim import Claim

CONFIDENCE, RESAMPLES = 0.95, 2000


def _boot(samples, statistic, paired: bool) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(*samples, axis)`` (scipy), NaN where undefined."""
    with np.errstate(all="ignore"):
        res = sps.bootstrap(
            samples, statistic, paired=paired, vectorized=True, n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(0),
        )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _threshold(ratio: float, lo: float, hi: float, factor: float, what: str, failures, undecided) -> None:
    """Holds when the CI's lower bound is >= factor, fails when its upper bound is below it."""
    if not all(math.isfinite(v) for v in (ratio, lo, hi)):
        undecided.append(f"{what} not finite: {ratio:.4g}, CI [{lo:.4g}, {hi:.4g}]")
    elif hi < factor:
        failures.append(f"{what} = {ratio:.4g}, CI [{lo:.4g}, {hi:.4g}] below {factor:g}")
    elif lo < factor:
        undecided.append(f"{what} = {ratio:.4g}, CI [{lo:.4g}, {hi:.4g}] straddles {factor:g}")


def super_activation_persists(claim: Claim, down_max, resid_max, super_layer: int, factor: float) -> dict:
    """The super activation appears at the detected layer and persists in the residual stream.

    ``down_max`` [W, L]: max |down_proj input| per window and layer; ``resid_max`` [W, L + 1]: max
    |residual stream| (index k: entering layer k, so index l + 1 is after layer l). Two parts:

    - appears: argmax_l max_w down_max[w, l] == super_layer (else falsified);
    - persists: per window r_w = median_{l > s} resid[w, l + 1] / median_{k <= s} resid[w, k]
      (the stream after the super layer s against the stream entering layers up to s);
      R = exp(mean_w log r_w) with its bootstrap CI over windows (``esa.stats.bootstrap_ci`` of
      log r): holds when CI low >= ``factor``, falsified when CI high < ``factor``.

    No layer after s, or non-finite maxima: inconclusive. Key value: R."""
    down, resid = np.asarray(down_max, dtype=float), np.asarray(resid_max, dtype=float)
    if down.ndim != 2 or resid.shape != (down.shape[0], down.shape[1] + 1):
        raise ValueError("down_max must be [W, L] and resid_max [W, L + 1]")
    s, n_layers = int(super_layer), down.shape[1]
    failures: list[str] = []
    undecided: list[str] = []
    peak = int(np.nanargmax(down.max(axis=0))) if np.isfinite(down).any() else -1
    claim.measure("peak_layer", peak)
    claim.measure("super_layer", s)
    if peak != s:
        failures.append(f"the largest down_proj input is at layer {peak}, not the super layer {s}")
    if s + 1 >= n_layers:
        claim.inconclusive(f"no layer after the super layer {s} of {n_layers}")
    with np.errstate(all="ignore"):
        log_r = np.log(np.median(resid[:, s + 2 :], axis=1)) - np.log(np.median(resid[:, : s + 1], axis=1))
    ratio = float(np.exp(log_r.mean()))
    lo, hi = (float(np.exp(v)) for v in stats.bootstrap_ci(log_r, confidence=CONFIDENCE, seed=0))
    claim.measure("persistence_ratio", ratio, ci=(lo, hi), key=True)
    _threshold(ratio, lo, hi, factor, "residual max after / before the super layer", failures, undecided)
    decide(claim, failures, undecided, f"peak at layer {s}; persistence {ratio:.4g} >= {factor:g}")
    return {"peak_layer": peak, "ratio": ratio}


def _mean_ratio(a, b, axis=-1):
    return np.mean(b, axis=axis) / np.mean(a, axis=axis)


def stopword_shift(claim: Claim, mass_original, mass_zeroed, factor: float) -> dict:
    """Zeroing the super weight raises the mean stop-word probability mass by >= ``factor``.

    ``mass_*`` [W]: per window, mean next-token probability on the stop words. R = mean(zeroed) /
    mean(original) with a paired bootstrap CI over windows: holds when CI low >= ``factor``,
    falsified when CI high < ``factor``. Fewer than 2 windows, zero or non-finite mass:
    inconclusive. Key value: R."""
    a, b = np.asarray(mass_original, dtype=float), np.asarray(mass_zeroed, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("stop-word masses must be [W] arrays of the same windows")
    claim.measure("stopword_mass_original", float(a.mean()) if a.size else math.nan)
    claim.measure("stopword_mass_zeroed", float(b.mean()) if b.size else math.nan)
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()) or not a.mean() > 0:
        claim.inconclusive(f"{a.size} windows; the stop-word masses cannot give a ratio CI")
    ratio = float(_mean_ratio(a, b))
    lo, hi = _boot((a, b), _mean_ratio, paired=True)
    claim.measure("stopword_mass_ratio", ratio, ci=(lo, hi), key=True)
    failures: list[str] = []
    undecided: list[str] = []
    _threshold(ratio, lo, hi, factor, "stop-word mass zeroed / original", failures, undecided)
    decide(claim, failures, undecided, f"stop-word mass x{ratio:.4g} >= {factor:g}")
    return {"ratio": ratio, "ci": (lo, hi)}


def _mean_difference(after, before, axis=-1):
    return np.mean(after, axis=axis) - np.mean(before, axis=axis)


def sink_after_super_layer(claim: Claim, share, super_layer: int) -> dict:
    """Heads after the super layer put more attention on the first token than heads up to it.

    ``share`` [L, H]: first-token attention share per layer and head. Heads of layers l > s
    (attention that reads the stream carrying the super activation) against heads of layers
    l <= s (their attention runs before layer s's MLP creates it): D = mean(after) − mean(up to s)
    with a two-sample bootstrap CI over heads. Holds when CI low > 0, falsified when CI high <= 0,
    otherwise inconclusive (no layer on either side, non-finite shares: inconclusive). Key value: D."""
    share = np.asarray(share, dtype=float)
    if share.ndim != 2:
        raise ValueError("share must be [layers, heads]")
    s = int(super_layer)
    after, before = share[s + 1 :].reshape(-1), share[: s + 1].reshape(-1)
    claim.measure("sink_share_after", float(after.mean()) if after.size else math.nan)
    claim.measure("sink_share_up_to", float(before.mean()) if before.size else math.nan)
    if after.size < 2 or before.size < 2 or not np.isfinite(share).all():
        claim.inconclusive(f"{before.size} heads up to and {after.size} after layer {s}: no CI")
    diff = float(_mean_difference(after, before))
    lo, hi = _boot((after, before), _mean_difference, paired=False)
    claim.measure("sink_share_difference", diff, ci=(lo, hi), key=True)
    failures: list[str] = []
    undecided: list[str] = []
    text = f"first-token share after − up to layer {s} = {diff:.4g}, CI [{lo:.4g}, {hi:.4g}]"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        undecided.append(text)
    elif hi <= 0:
        failures.append(f"{text} not above 0")
    elif lo <= 0:
        undecided.append(f"{text} straddles 0")
    decide(claim, failures, undecided, text)
    return {"difference": diff, "ci": (lo, hi)}
