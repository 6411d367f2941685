"""Decision rule of the zero-shot claim: pure functions of a `Claim` and item counts.

Accuracies are counts of correct items out of n (pooled over the tasks). The drop in points is
d = 100·(k_random − k_super)/n; its CI is Newcombe's hybrid score interval (method 10, 1998) from
the two Wilson intervals (l_i, u_i) of scipy.stats.binomtest:
L = d − 100·√((p_r − l_r)² + (u_s − p_s)²),  U = d + 100·√((u_r − p_r)² + (p_s − l_s)²).
Wilson intervals never collapse to zero width, so a handful of items cannot decide by luck: the CI
half-width shrinks like 1/√n (about 100·z·√(2·0.25/n) points at p = 0.5), and a drop of X points is
resolvable only when (U − L)/2 ≤ X/2, i.e. n ≥ 0.5·z²·(200/X)² ≈ 770 items per arm at X = 10.
experiments/test_rules_zeroshot.py feeds it synthetic counts where it must hold, be falsified and
be inconclusive.
"""

from __future__ import annotations

import math

from scipy import stats as sps

from esa.claims.claim import Claim


def wilson(k: int, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n at confidence ``level`` (scipy)."""
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def drop_ci(k_random: int, k_super: int, n: int, level: float) -> tuple[float, float, float]:
    """(drop, low, high) in accuracy points: Newcombe's interval of p_random − p_super (module doc)."""
    p_r, p_s = k_random / n, k_super / n
    (l_r, u_r), (l_s, u_s) = wilson(k_random, n, level), wilson(k_super, n, level)
    d = p_r - p_s
    low = d - math.sqrt((p_r - l_r) ** 2 + (u_s - p_s) ** 2)
    high = d + math.sqrt((u_r - p_r) ** 2 + (p_s - l_s) ** 2)
    return 100.0 * d, 100.0 * low, 100.0 * high


def min_half_width(n: int, level: float) -> float:
    """Smallest CI half-width (points) n items can give, whatever the accuracies: Newcombe's interval
    is narrowest at k_random = n, k_super = 0, where it is 100·w/√2 with w = Wilson's width at 0/n."""
    return 100.0 * wilson(0, n, level)[1] / math.sqrt(2)


def resolvable(claim: Claim, n: int, points: float, level: float) -> None:
    """Inconclusive before any measurement when n items cannot resolve ``points`` at all
    (``min_half_width(n) > points / 2``; n < 1 likewise)."""
    claim.measure("items", int(n))
    if n < 1:
        claim.inconclusive("no zero-shot items")
    best = min_half_width(n, level)
    if best > points / 2:
        claim.inconclusive(
            f"{n} items give a CI half-width >= {best:.3g} points whatever the accuracies, more than "
            f"{points / 2:g}: too few to resolve a drop of {points:g} points"
        )


def accuracy_drop(claim: Claim, k_random: int, k_super: int, n: int, points: float, level: float) -> dict:
    """Zeroing the super set drops accuracy by ≥ ``points`` vs the random set.

    Key value: the drop with its Newcombe CI. Inconclusive when n < 1 or the CI half-width exceeds
    points/2 (the items cannot resolve the effect); then holds iff drop ≥ points (so L ≥ points/2
    > 0); falsified iff U < points (the drop is below ``points`` at ``level``); else inconclusive.
    """
    if n < 1:
        claim.inconclusive("no zero-shot items")
    d, low, high = drop_ci(k_random, k_super, n, level)
    half = (high - low) / 2
    claim.measure("accuracy_drop_points", d, ci=(low, high), key=True)
    claim.measure("ci_half_width_points", half)
    claim.measure("items", int(n))
    out = {"drop": d, "ci": (low, high), "half_width": half, "n": int(n)}
    text = f"drop {d:.3g} points, {level:.0%} CI [{low:.3g}, {high:.3g}] on {n} items"
    if half > points / 2:
        claim.inconclusive(
            f"{text}: half-width {half:.3g} > {points / 2:g}, too few items to resolve {points:g}"
        )
    if d >= points:
        claim.check(True, f"{text}: drop >= {points:g}")
    elif high < points:
        claim.check(False, f"{text}: upper bound < {points:g}")
    else:
        claim.inconclusive(f"{text}: below {points:g} but the CI reaches it")
    return out
