"""Decision rules of the phase-5.3 interpretability claims (super-activation tracing, stop-word shift,
attention sinks, concentration in attention heads): pure functions of a `Claim` and plain arrays (esa.analyses.interpret's output).

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


def _top_concentration(counts, sizes, m: int):
    """Per row of ``counts`` [..., C]: the top-m cells by density (count / size), their share of the
    entries over their share of the weights; and the two shares."""
    order = np.argsort(-(counts / sizes), axis=-1, kind="stable")[..., :m]
    top_n = np.take_along_axis(counts, order, axis=-1).sum(axis=-1) / counts.sum(axis=-1)
    top_w = sizes[order].sum(axis=-1) / sizes.sum()
    return top_n / top_w, top_n, top_w


def heads_concentrated(
    claim: Claim, counts, sizes, top_fraction: float, factor: float, alpha: float, draws: int,
    min_expected: float, seed: int = 0, groups=None,
) -> dict:  # fmt: skip
    """The selection's attention entries concentrate in a few head slices.

    ``counts`` [C]: selected entries per head slice (cell: layer, projection, head); ``sizes`` [C]:
    its number of weights; ``groups`` [C] (optional): a label per cell, e.g. its (layer, projection).
    The top m = ceil(top_fraction x C) cells by density (count / size) hold a share of the entries;
    concentration R = that share / their share of the weights (>= 1 by construction).
    Null: each group's observed entries fall on its cells in proportion to their sizes (multinomial
    per group; one group without labels), so a layer or projection that holds more entries than
    another does not count as a head role. ``draws`` seeded null draws; empirical
    p = (1 + #{null R >= R}) / (1 + draws). Holds when R >= ``factor`` and p < ``alpha``; falsified
    when either fails. Inconclusive: fewer than 2 cells or m = C, or some cell's expected count
    N x size / total < ``min_expected`` (Cochran: too few attention entries to decide). The
    chi-square goodness-of-fit p against the same null (scipy) is reported beside it. Key value: R."""
    n, w = np.asarray(counts, dtype=float), np.asarray(sizes, dtype=float)
    if n.shape != w.shape or n.ndim != 1 or (w <= 0).any() or (n < 0).any():
        raise ValueError("counts and sizes must be [C] arrays, sizes > 0, counts >= 0")
    total, cells = float(n.sum()), n.size
    m = max(1, math.ceil(top_fraction * cells))
    labels = np.unique(np.zeros(cells) if groups is None else np.asarray(groups), return_inverse=True)[1]
    n_g, w_g = np.bincount(labels, n), np.bincount(labels, w)
    expected = total * w / w.sum() if cells else w  # over all cells: the power check below
    claim.measure("attention_entries", int(total))
    claim.measure("head_cells", cells)
    claim.measure("top_cells", m)
    claim.measure("null_groups", int(n_g.size))
    claim.measure("min_expected_count", float(expected.min()) if cells else math.nan)
    if cells < 2 or m >= cells:
        claim.inconclusive(f"{cells} head cells: the top {m} are all of them")
    if expected.min() < min_expected:
        claim.inconclusive(
            f"{int(total)} attention entries over {cells} head cells: smallest expected count "
            f"{expected.min():.3g} < {min_expected:g} (too few to decide)"
        )
    ratio, top_n, top_w = (float(v) for v in _top_concentration(n, w, m))
    rng, null = np.random.default_rng(seed), np.zeros((draws, cells))
    for g in range(n_g.size):
        at = labels == g
        null[:, at] = rng.multinomial(int(n_g[g]), w[at] / w_g[g], size=draws)
    null_ratio = _top_concentration(null, w, m)[0]
    p = float((1 + np.sum(null_ratio >= ratio)) / (1 + draws))
    claim.measure("top_share", top_n)
    claim.measure("top_weight_share", top_w)
    claim.measure("top_concentration", ratio, key=True)
    claim.measure("null_concentration_median", float(np.median(null_ratio)))
    claim.measure("pvalue", p)
    fit = n_g[labels] * w / w_g[labels]  # the null's expected counts (0 in a group without entries)
    claim.measure("chisquare_pvalue", float(sps.chisquare(n[fit > 0], fit[fit > 0]).pvalue))
    failures: list[str] = []
    text = f"top {m} of {cells} head cells hold {top_n:.3g} of the entries, {ratio:.3g}x their weight share"
    if ratio < factor:
        failures.append(f"{text} < {factor:g}x")
    if p >= alpha:
        failures.append(
            f"concentration {ratio:.3g} not beyond the proportional null (per group): p = {p:.3g} >= {alpha:g}"
        )
    decide(claim, failures, [], f"{text} (p = {p:.3g})")
    return {"ratio": ratio, "pvalue": p, "top_share": top_n, "top_weight_share": top_w}
