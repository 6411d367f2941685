"""Decision rules of the claims on the old runner's analyses (issue 13; test_phase5_runner_analyses.py):
progressive perturbation, the weight analysis (where the critical weights lie) and the stability
of the top-k across numerical precision. The advanced perturbations decide by phase 3's
``rules_perturbation.dominates``.

As in rules_perturbation.py, each rule measures what it decides on and decides only through the
claim (``check``: holds / falsified; ``inconclusive``: the data cannot decide); rules never touch a
model, so experiments/test_rules_analyses.py feeds them synthetic measurements. Where a rule has a
CI it decides three ways (``rules_profiling.decide``): holds when the point and the whole 95% CI
satisfy the threshold, falsified when none of them do, inconclusive when the CI straddles it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from rules_profiling import decide, set_ratio, set_ratio_with_ci

from esa import stats
from esa.claims.claim import Claim


# -- progressive perturbation ------------------------------------------------------------------
def needed_interval(curve: Sequence[Mapping]) -> tuple[float, float]:
    """Where the number of weights a progressive curve needs lies, [lo, hi] (integers or ∞).

    ``curve``: points {"n_weights", "reached"} of nested sets (``esa.analyses.progressive``).
    hi = the first count that reached the target (∞ if none did); lo = 1 + the largest count below
    it that did not (0 if none). Assumes damage does not fall back below the target between two
    grid counts, so the true count lies in (previous count, first reaching count]."""
    prev = 0
    for p in sorted(curve, key=lambda p: int(p["n_weights"])):
        n = int(p["n_weights"])
        if p["reached"]:
            return float(prev + 1), float(n)
        prev = max(prev, n)
    return float(prev + 1), math.inf


def _largest(curve: Sequence[Mapping]) -> int:
    return max((int(p["n_weights"]) for p in curve), default=0)


def fewer_weights_needed(
    claim: Claim, critical: Sequence[Mapping], random: Sequence[Mapping], factor: float
) -> dict:
    """Critical weights reach the damage target with ≥ ``factor`` x fewer weights than random ones.

    With t_c ∈ [lo_c, hi_c] and t_r ∈ [lo_r, hi_r] (`needed_interval`), the ratio t_r / t_c lies in
    [lo_r / hi_c, hi_r / lo_c]. Holds iff the lower bound ≥ factor (random never reaching within its
    cap gives lo_r = cap + 1: a lower bound that must already clear the factor); falsified iff the
    upper bound < factor (e.g. random reached it and critical did not); otherwise inconclusive
    (neither reached it, the random cap is too small, or the doubling grid is too coarse).
    Key value: n_r / n_c on the grid when both reached, else the finite bound (NaN when none)."""
    (lo_c, hi_c), (lo_r, hi_r) = needed_interval(critical), needed_interval(random)
    lower, upper = lo_r / hi_c, hi_r / lo_c
    if math.isfinite(hi_c) and math.isfinite(hi_r):
        point = hi_r / hi_c
    else:
        point = lower if math.isfinite(hi_c) else upper if math.isfinite(hi_r) else math.nan
    need = {k: int(hi) if math.isfinite(hi) else None for k, hi in (("critical", hi_c), ("random", hi_r))}
    claim.measure("random_over_critical", point, ci=(lower, upper), key=True)
    claim.measure("weights_needed", need)
    claim.measure("largest_set", {"critical": _largest(critical), "random": _largest(random)})
    text = f"random / critical weights needed in [{lower:.4g}, {upper:.4g}] vs {factor:g}"
    if lower >= factor:
        claim.check(True, text)
    elif upper < factor:
        claim.check(False, text)
    elif need["critical"] is None and need["random"] is None:
        claim.inconclusive(f"neither set reached the damage target ({text})")
    else:
        claim.inconclusive(f"the bounds straddle the factor: {text}")
    return {"lower": lower, "upper": upper, "point": point, **need}


# -- weight analysis: do the critical weights line up in columns? --------------------------------
def dominant_share(frame: pd.DataFrame, line: str = "col") -> dict[str, float]:
    """Per tensor: the share of its selected entries that lie in its most common ``line`` ("col":
    input channel, "row": output channel). ``frame``: one row per entry with ``tensor`` and ``line``
    columns (``Selection.to_frame(param_map)``)."""
    counts = frame.groupby(["tensor", line], sort=False).size()
    by_tensor = counts.groupby(level=0, sort=False)
    share = by_tensor.max() / by_tensor.sum()
    return {str(t): float(v) for t, v in share.items()}


def _mean_ratio(top: np.ndarray, rnd: np.ndarray):
    def stat(idx, axis=-1):
        i = np.asarray(idx, dtype=int)
        with np.errstate(all="ignore"):
            return top[i].mean(axis=axis) / rnd[i].mean(axis=axis)

    return stat


def concentrated_vs_random(
    claim: Claim, top_share: Mapping[str, float], random_share: Mapping[str, float], factor: float
) -> dict:
    """The top-k's dominant-line share is ≥ ``factor`` x a random set's, over the same tensors.

    R = mean_t top_share[t] / mean_t random_share[t] over the tensors in both mappings, with a 95%
    CI by a paired bootstrap over tensors (the tensors are the sampling units); decided three ways
    (``rules_profiling.decide``, R ≥ factor). No common tensor, or a non-finite R or CI:
    inconclusive. Key value: R."""
    names = [t for t in top_share if t in random_share]
    claim.measure("tensors", len(names))
    if not names:
        claim.inconclusive("no tensor with both sets (and more than one column) to compare")
    top = np.array([top_share[t] for t in names], dtype=float)
    rnd = np.array([random_share[t] for t in names], dtype=float)
    claim.measure("mean_share_top", float(top.mean()))
    claim.measure("mean_share_random", float(rnd.mean()))
    claim.measure("share_top_quartiles", np.quantile(top, [0.25, 0.5, 0.75]).tolist())
    stat = _mean_ratio(top, rnd)
    ratio = float(stat(np.arange(len(names))))
    ci = stats.bootstrap_ci(np.arange(len(names)), stat=stat) if len(names) > 1 else (ratio, ratio)
    decide(claim, "share_ratio_top_random", ratio, ci, ">=", factor)
    return {"ratio": ratio, "ci": ci}


# -- stability of the top-k across conditions (numerical precision) ------------------------------
def stable_across_conditions(
    claim: Claim, counts: np.ndarray, threshold: float, changed_share: float
) -> None:
    """Top-k Jaccard between two conditions' selections > ``threshold``, decided on its 95% CI by a
    bootstrap over tensors (``rules_profiling.set_ratio_with_ci``; counts [T, 3] per tensor:
    |A∩B|, |A|, |B| from ``rules_profiling.set_counts``). ``changed_share``: the share of tensors
    whose scores differ between the conditions; when none does (bit-identical scores) the claim
    compared nothing and is inconclusive, as is a non-finite share. Key value: the Jaccard."""
    c = np.asarray(counts, dtype=float).reshape(-1, 3)
    claim.measure("tensors_changed_share", changed_share)
    claim.measure("overlap", set_ratio(c, "overlap"))
    with np.errstate(all="ignore"):
        per_tensor = np.where(c[:, 1] + c[:, 2] > c[:, 0], c[:, 0] / (c[:, 1] + c[:, 2] - c[:, 0]), 1.0)
    claim.measure("min_tensor_jaccard", float(per_tensor.min()) if per_tensor.size else math.nan)
    claim.require_finite(tensors_changed_share=changed_share)
    if not changed_share > 0:
        claim.inconclusive("the two conditions gave bit-identical scores: nothing was compared")
    if not c.size:
        claim.inconclusive("no tensor selected")
    point, ci = set_ratio_with_ci(c, "jaccard")
    decide(claim, "jaccard", point, ci, ">", threshold)
