"""Decision rules of the phase-5 claims (super-weight controls, the scale sweep, tamper detection,
the bit-flip search): pure functions of a `Claim` and plain measurements.

As in rules_perturbation.py, each rule measures what it decides on and decides only through the
claim (``check``: holds / falsified; ``inconclusive``: the data cannot decide). Inputs are per-window
mean NLLs (``[W]`` per condition, the same W evaluation windows), ΔPPL values, or the plain reports
of ``esa.analyses``. experiments/test_rules_applications.py feeds every rule synthetic data where it
must hold, be falsified and be inconclusive. A rule combining several parts: any decided failure
falsifies, otherwise any undecided part makes it inconclusive, otherwise it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from rules_perturbation import _decide as decide

from esa import stats
from esa.claims.claim import Claim
from esa.claims.verdict import below_min_tier


def measured_at_min_tier(claim: Claim, item, tier) -> None:
    """Inconclusive before measuring when the run's tier is below the claim's ``min_tier`` marker
    (the claim would be inconclusive anyway; its measurement is the expensive part)."""
    why = below_min_tier(item, tier)
    if why:
        claim.inconclusive(f"{why}; not measured at this tier")


def _ppl(nll) -> np.ndarray:
    """exp(mean NLL over windows) of [W] (a float) or [N, W] (one per row)."""
    with np.errstate(all="ignore"):
        return np.exp(np.asarray(nll, dtype=float).mean(axis=-1))


def beyond_single_weight_null(
    claim: Claim, base_nll, super_nll, null_nll, alpha: float, factor: float
) -> dict:
    """Zeroing the super weight damages more than zeroing any of N random single weights.

    ΔPPL = exp(mean NLL) − exp(mean base NLL) for the super weight (``super_nll`` [W]) and each null
    draw (``null_nll`` [N, W]). Holds iff (1) the empirical p = (1 + #{null ≥ obs}) / (1 + N) < alpha,
    (2) the super weight's ΔPPL has its window-bootstrap CI above 0, and (3) where the largest null
    ΔPPL is positive, ΔPPL(super) ≥ factor × that maximum (an overflowed super ΔPPL, inf, passes (3)).
    NaN anywhere, or an overflowed super ΔPPL against an overflowed null draw: inconclusive.
    Key value: p."""
    base_ppl = float(_ppl(base_nll))
    obs, null = float(_ppl(super_nll)) - base_ppl, _ppl(null_nll).reshape(-1) - base_ppl
    p = stats.empirical_p_value(obs, null)
    lo, hi = stats.window_bootstrap(base_nll, {"super": super_nll}).ci("super")
    top = float(np.max(null)) if null.size else math.nan
    claim.measure("p_value", p, key=True)
    claim.measure("delta_ppl_super_weight", obs, ci=(lo, hi))
    claim.measure("null_draws", int(null.size))
    claim.measure("null_delta_ppl_median", float(np.median(null)) if null.size else math.nan)
    claim.measure("null_delta_ppl_max", top)
    if math.isnan(p) or math.isnan(obs) or (math.isinf(obs) and np.isinf(null).any()):
        claim.inconclusive(f"ΔPPL not comparable: super {obs}, null max {top}")
    failures = [] if p < alpha else [f"empirical p = {p:.4g} ≥ {alpha:g} over {null.size} random weights"]
    if not lo > 0:
        failures.append(f"ΔPPL(super weight) = {obs:.4g}, CI [{lo:.4g}, {hi:.4g}] not above 0")
    if top > 0 and not obs >= factor * top:
        failures.append(f"ΔPPL(super weight) = {obs:.4g} < {factor:g} x largest random ΔPPL {top:.4g}")
    elif top > 0:
        claim.measure("ratio_to_null_max", obs / top)
    decide(claim, failures, [], f"p = {p:.4g} < {alpha:g}; ΔPPL {obs:.4g} vs null max {top:.4g}")
    return {"p_value": p, "delta_ppl": obs, "null_max": top}


def _ratio_ci(boot: stats.WindowBootstrap, base, nll) -> tuple[float, float, float]:
    """PPL(nll) / PPL(base) = exp(mean(nll − base)) with its CI over the bootstrap's resamples."""
    with np.errstate(all="ignore"):
        d = np.asarray(nll, dtype=float) - np.asarray(base, dtype=float)
        point, samples = float(np.exp(d.mean())), np.exp(d[boot.indices].mean(axis=1))
    lo, hi = stats.percentile_ci(samples, boot.confidence)
    return point, lo, hi


def scale_sweep_shape(
    claim: Claim, factors: Sequence[float], nll_by_factor: Sequence, catastrophe: float
) -> dict:
    """The super weight's original scale is near the PPL optimum and removing it is catastrophic.

    ``nll_by_factor[i]``: per-window NLL [W] with the weight scaled by ``factors[i]``; factors must
    contain 1 (the unperturbed model, the base) and 0 (the weight removed). ΔPPL(f) = PPL(f) −
    PPL(1) with paired window-bootstrap CIs. Two parts:

    - near the optimum: f* = the factor of lowest finite PPL; holds when f* = 1 or the CI of ΔPPL(f*)
      reaches 0 (PPL(1) lies within the CI of the minimum); falsified when it lies below 0 (some
      factor is significantly better than the original weight).
    - catastrophic removal: R = PPL(0) / PPL(1) with its CI; holds when the CI's lower bound is ≥
      ``catastrophe`` or PPL(0) is non-finite (an overflow is a failure, as for bit flips);
      falsified when the upper bound is below it; undecided when the CI straddles it.

    Key value: R. NaN NLL: undecided."""
    fs = [float(f) for f in factors]
    if 1.0 not in fs or 0.0 not in fs or len(fs) != len(nll_by_factor):
        raise ValueError("scale_sweep_shape needs one NLL array per factor, factors 0 and 1 among them")
    base, zero = nll_by_factor[fs.index(1.0)], nll_by_factor[fs.index(0.0)]
    names = {f"{f:g}": nll for f, nll in zip(fs, nll_by_factor) if f != 1.0}
    boot = stats.window_bootstrap(base, names)
    delta = {f: (0.0 if f == 1.0 else boot.point[f"{f:g}"]) for f in fs}
    claim.measure("delta_ppl_by_factor", {f"{f:g}": v for f, v in delta.items()})
    claim.measure("ppl_by_factor", {f"{f:g}": boot.base_ppl + v for f, v in delta.items()})
    failures, undecided = [], []
    if any(np.isnan(np.asarray(n, dtype=float)).any() for n in nll_by_factor):
        undecided.append("NaN window NLL in the sweep")
    best = min((f for f in fs if math.isfinite(delta[f])), key=lambda f: delta[f])
    claim.measure("best_factor", best)
    if best != 1.0:
        lo, hi = boot.ci(f"{best:g}")
        claim.measure("delta_ppl_best_factor", delta[best], ci=(lo, hi))
        if hi < 0:
            failures.append(
                f"factor {best:g} lowers PPL by {-delta[best]:.4g} (ΔPPL CI [{lo:.4g}, {hi:.4g}] below 0): "
                "the original scale is not at the optimum"
            )
    ratio, rlo, rhi = _ratio_ci(boot, base, zero)
    claim.measure("ppl_ratio_removed", ratio, ci=(rlo, rhi), key=True)
    if np.isposinf(np.asarray(zero, dtype=float)).any() or (math.isfinite(rlo) and rlo >= catastrophe):
        pass
    elif math.isfinite(rhi) and rhi < catastrophe:
        failures.append(f"PPL(0) / PPL(1) = {ratio:.4g}, CI [{rlo:.4g}, {rhi:.4g}] below {catastrophe:g}")
    else:
        undecided.append(
            f"PPL(0) / PPL(1) = {ratio:.4g}, CI [{rlo:.4g}, {rhi:.4g}] straddles {catastrophe:g}"
        )
    decide(claim, failures, undecided, f"best factor {best:g}; PPL(0)/PPL(1) = {ratio:.4g} ≥ {catastrophe:g}")
    return {"best": best, "ratio": ratio}


def planted_found_first(claim: Claim, report, planted: str, margin: float) -> dict:
    """A planted change is detected and located first: the planted entry (``report.watched[planted]``
    of ``esa.analyses.tamper.compare_scores``) has exceedance > margin, rank 1 among all entries,
    and its tensor ranks 1 among tensors. NaN exceedance: inconclusive. Key value: the rank."""
    w = report.watched[planted]
    claim.measure("planted_rank", w["rank"], key=True)
    claim.measure("planted_exceedance", w["exceedance"])
    claim.measure("planted_tensor_rank", w["tensor_rank"])
    claim.measure("n_detected", report.n_detected)
    claim.measure("top_entries", report.top[:5])
    if math.isnan(w["exceedance"]):
        claim.inconclusive("the planted entry's exceedance is NaN")
    failures = []
    if not w["exceedance"] > margin:
        failures.append(f"planted entry not detected: exceedance {w['exceedance']:.4g} ≤ margin {margin:g}")
    if w["rank"] != 1:
        failures.append(f"planted entry ranks {w['rank']}, not 1")
    if w["tensor_rank"] != 1:
        failures.append(f"planted tensor ranks {w['tensor_rank']}, not 1")
    decide(claim, failures, [], f"planted entry first, exceedance {w['exceedance']:.4g} > {margin:g}")
    return w


def nothing_found(claim: Claim, report, margin: float) -> None:
    """An unchanged copy shows no tamper: no entry's exceedance is above the margin. Key value: the
    largest exceedance (0 when the two score maps are identical)."""
    claim.measure("max_exceedance", report.max_exceedance, key=True)
    claim.measure("n_detected", report.n_detected)
    claim.measure("top_entries", report.top[:3])
    claim.check(
        report.n_detected == 0,
        f"{report.n_detected} entries detected (largest exceedance {report.max_exceedance:.4g} > {margin:g})",
    )


def search_beats_random(
    claim: Claim, guided: int | None, random: int | None, random_max: int, factor: float
) -> dict:
    """The sensitivity-guided bit search fails the model with ≥ factor x fewer flips than random.

    guided / random: flips to failure (None: no failure within the budget; random_max: the largest
    random count tried). Both fail: ratio = random / guided. Only guided fails: random needs more
    than random_max, so the ratio is > random_max / guided (a lower bound; holds when it alone is ≥
    factor, else undecided). Guided never fails: falsified when random did, else undecided. Key:
    the ratio."""
    claim.measure("flips_to_failure", {"guided": guided, "random": random, "random_max": random_max})
    if guided is None:
        claim.measure("ratio", math.nan, key=True)
        if random is None:
            claim.inconclusive(f"neither the guided search nor {random_max} random flips failed the model")
        claim.check(False, f"random flips failed the model at {random}, the guided search never did")
        return {}
    ratio = (random if random is not None else random_max) / guided
    bound = "exact" if random is not None else "lower"
    claim.measure("ratio", ratio, key=True)
    claim.measure("ratio_bound", bound)
    if bound == "lower" and ratio < factor:
        claim.inconclusive(
            f"random never failed within {random_max} flips: ratio > {ratio:.4g}, below {factor:g}"
        )
    claim.check(ratio >= factor, f"random / guided flips = {ratio:.4g} ({bound}) vs {factor:g}")
    return {"ratio": ratio, "bound": bound}


def only_position_catastrophic(
    claim: Claim, failed_by_position: Mapping[str, bool], catastrophic: str
) -> dict:
    """Random flips fail the model at the ``catastrophic`` bit position and at no other: the
    measured per-position failure flags (random weights, one flip each) against that statement.
    Key value: the number of positions where random flips failed the model."""
    failing = sorted(p for p, f in failed_by_position.items() if f)
    claim.measure("positions_failing", len(failing), key=True)
    claim.measure("failing_positions", failing)
    failures = []
    if not failed_by_position.get(catastrophic, False):
        failures.append(f"random {catastrophic} flips did not fail the model")
    others = [p for p in failing if p != catastrophic]
    if others:
        failures.append(f"random flips also fail the model at {others}")
    decide(claim, failures, [], f"only {catastrophic} flips fail the model")
    return {"failing": failing}
