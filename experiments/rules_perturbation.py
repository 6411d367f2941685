"""Decision rules of the phase-3 claims: pure functions of a `Claim` and plain measurements.

Each rule measures what it decides on (``claim.measure``), then decides through the claim only:
``claim.check`` (holds / falsified), ``claim.inconclusive`` (the data cannot decide: non-finite
measurements, an overflowed perplexity on both sides). Inputs are per-window mean NLLs (``[W]`` for
the unperturbed model, ``[S, W]`` for S seeds of a perturbed one, the same W windows) or ΔPPL
values; the statistics are ``esa.stats`` (paired bootstrap over windows, Wilcoxon on per-window
differences, empirical p-values). experiments/test_rules_perturbation.py feeds every rule synthetic
data where it must hold, be falsified and be inconclusive.

Where a rule combines several comparisons: any decided failure falsifies it; otherwise any
undecided comparison makes it inconclusive; otherwise it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from esa import stats
from esa.claims.claim import Claim


def _decide(claim: Claim, failures: list[str], undecided: list[str], holds: str) -> None:
    """Falsified by any failure, else inconclusive by any undecided part, else holds."""
    if failures:
        claim.check(False, "; ".join(failures))
    if undecided:
        claim.inconclusive("; ".join(undecided))
    claim.check(True, holds)


def dominates(
    claim: Claim, base_nll, num_nll, den_nll, factor: float, names: tuple[str, str] = ("super", "random")
) -> dict:
    """ΔPPL(num) ≥ factor × ΔPPL(den), by ``esa.stats.dominance`` on the paired window bootstrap.

    Holds iff num's ΔPPL CI is above 0 and (den's ΔPPL > 0: the ratio num/den ≥ factor; den ≤ 0:
    the difference num − den has its CI above 0). Non-finite ΔPPL on either side: inconclusive.
    Key value: the ratio (or difference) with its bootstrap CI."""
    num, den = names
    boot = stats.window_bootstrap(base_nll, {num: num_nll, den: den_nll})
    out = stats.dominance(boot, num, den, factor)
    claim.measure(f"{out['key']}_{num}_{den}", out["value"], ci=out["ci"], key=True)
    claim.measure(f"delta_ppl_{num}", out["num_point"], ci=out["num_ci"])
    claim.measure(f"delta_ppl_{den}", out["den_point"], ci=out["den_ci"])
    if not out["decided"]:
        claim.inconclusive(out["reason"])
    claim.check(out["holds"], out["reason"])
    return out


def material_damage(claim: Claim, base_nll, super_nll, minimum: float) -> None:
    """ΔPPL(super) ≥ minimum, judged by the lower bound of its window-bootstrap CI.

    Key value: ΔPPL(super) with its CI; non-finite point or bound: inconclusive."""
    boot = stats.window_bootstrap(base_nll, {"super": super_nll})
    point, (lo, hi) = boot.point["super"], boot.ci("super")
    claim.measure("delta_ppl_super", point, ci=(lo, hi), key=True)
    claim.require_finite(delta_ppl_super=point, ci_low=lo)
    claim.check(
        lo >= minimum, f"ΔPPL(super) = {point:.4g}, CI [{lo:.4g}, {hi:.4g}]: lower bound vs {minimum:g}"
    )


def paired_significant(claim: Claim, super_nll, random_nll, alpha: float) -> dict:
    """The super set damages more than the random set, window by window: one-sided Wilcoxon
    signed-rank test on per-window ΔNLL = NLL(super) − NLL(random) (seeds averaged per window;
    the baseline cancels), p < alpha. NaN p (inf − inf in a window): inconclusive."""
    test = stats.paired_window_test(super_nll, random_nll, alternative="greater")
    claim.measure("p_value", test["p_value"], key=True)
    claim.measure("wilcoxon_statistic", test["statistic"])
    claim.measure("n_windows", test["n"])
    claim.measure("mean_delta_nll_super_minus_random", test["mean_diff"], ci=test["ci"])
    claim.require_finite(p_value=test["p_value"])
    claim.check(test["p_value"] < alpha, f"Wilcoxon p = {test['p_value']:.4g} vs {alpha:g} (n = {test['n']})")
    return test


def beyond_null(claim: Claim, observed: Sequence[float], null, alpha: float) -> list[float]:
    """Every seed's super-set ΔPPL lies beyond the null of random sets.

    observed: [S] ΔPPL of the super set per seed; null: [N] ΔPPL of N random sets (one null for
    every seed: a random set does not depend on the calibration seed).
    p_s = (1 + #{null ≥ observed_s}) / (1 + N) (``esa.stats.empirical_p_value``); holds iff
    max_s p_s < alpha (key value: that max). NaN anywhere, or an infinite observation against an
    infinite null draw (inf vs inf is no ordering): inconclusive."""
    obs, table = np.asarray(observed, dtype=float), np.asarray(null, dtype=float)
    if table.ndim != 1 or table.size == 0:
        raise ValueError(f"null must be a non-empty [N] sample, got shape {table.shape}")
    p = [stats.empirical_p_value(o, table) for o in obs]
    worst = float(np.max(p))  # NaN propagates (builtin max may skip it)
    claim.measure("max_p_value", worst, key=True)
    claim.measure("p_value_per_seed", p)
    claim.measure("delta_ppl_super_per_seed", obs.tolist())
    claim.measure("null_sets", int(table.size))
    claim.measure("null_median", float(np.median(table)))
    claim.measure("null_max", float(table.max()))
    ties = [i for i, o in enumerate(obs) if math.isinf(o) and np.isinf(table).any()]
    if ties:
        claim.inconclusive(f"overflowed ΔPPL of the super set and of null draws at seeds {ties}")
    claim.require_finite(max_p_value=worst)
    claim.check(
        worst < alpha, f"largest empirical p over seeds {worst:.4g} vs {alpha:g} ({table.size} random sets)"
    )
    return p


def dose_monotonic(
    claim: Claim, scales: Sequence[float], base_nll, nll_by_scale: Sequence, alpha: float
) -> dict:
    """ΔPPL(super) rises with the dose: Spearman ρ > 0 with p < alpha over the grid AND the top
    dose's ΔPPL CI lies above 0 (a rank order of values at floating-point noise level is no
    evidence). nll_by_scale[i]: [W] or [S, W] NLL at scales[i] (at σ = 0, the base itself).
    Key value: ρ. Non-finite ΔPPL, ρ or p: inconclusive."""
    if len(scales) != len(nll_by_scale) or len(scales) < 3:
        raise ValueError("dose_monotonic needs one NLL array per scale and at least 3 scales")
    names = [f"{s:g}" for s in scales]
    boot = stats.window_bootstrap(base_nll, dict(zip(names, nll_by_scale)))
    points = [boot.point[n] for n in names]
    mono = stats.spearman_monotonic(list(scales), points)
    top = names[int(np.argmax(scales))]
    lo, hi = boot.ci(top)
    claim.measure("spearman_rho", mono["rho"], key=True)
    claim.measure("spearman_p_value", mono["pvalue"])
    claim.measure("delta_ppl_super_by_scale", points, ci=None)
    claim.measure("delta_ppl_super_top_dose", boot.point[top], ci=(lo, hi))
    claim.require_finite(**{f"delta_ppl_{n}": v for n, v in zip(names, points)})
    claim.require_finite(spearman_rho=mono["rho"], spearman_p_value=mono["pvalue"], top_ci_low=lo)
    failures = []
    if not (mono["rho"] > 0 and mono["pvalue"] < alpha):
        failures.append(
            f"Spearman ρ = {mono['rho']:.3g}, p = {mono['pvalue']:.3g} (need ρ > 0, p < {alpha:g})"
        )
    if not lo > 0:
        failures.append(f"top dose σ = {top}: ΔPPL CI [{lo:.4g}, {hi:.4g}] not above 0")
    _decide(claim, failures, [], f"ρ = {mono['rho']:.3g} (p = {mono['pvalue']:.3g}), top-dose CI above 0")
    return mono


def hierarchy_kept(
    claim: Claim, base_nll, by_scale: Mapping[float, Mapping[str, object]], factors: tuple[float, float]
) -> dict:
    """At every dose: ΔPPL(super) ≥ factors[0] × ΔPPL(random) and ΔPPL(random) ≥ factors[1] ×
    ΔPPL(bottom), each by the dominance rule (one paired bootstrap per dose). by_scale: scale ->
    {"super", "random", "bottom"} NLL arrays. Key value: the number of doses where both hold."""
    failures, undecided, kept = [], [], []
    for scale, sets in by_scale.items():
        boot = stats.window_bootstrap(base_nll, dict(sets))
        links = [
            stats.dominance(boot, "super", "random", factors[0]),
            stats.dominance(boot, "random", "bottom", factors[1]),
        ]
        kept.append(all(d["decided"] and d["holds"] for d in links))
        for d, what in zip(links, ("super/random", "random/bottom")):
            entry = f"σ = {scale:g} {what}: {d['reason']}"
            if not d["decided"]:
                undecided.append(entry)
            elif not d["holds"]:
                failures.append(entry)
        for d, what in zip(links, ("super_random", "random_bottom")):
            claim.measure(f"{d['key']}_{what}_sigma_{scale:g}", d["value"], ci=d["ci"])
    claim.measure("scales_kept", sum(kept), key=True)
    _decide(claim, failures, undecided, f"hierarchy kept at all {len(kept)} doses")
    return {"kept": kept}


def all_significant(claim: Claim, pairs: Mapping[str, tuple], alpha: float) -> dict[str, float]:
    """For every perturbation type the super set damages more than the random set, window by
    window (one-sided Wilcoxon on per-window ΔNLL, as `paired_significant`), p < alpha.
    pairs: type -> (super NLL, random NLL). Key value: the largest p; NaN p: undecided."""
    p = {t: stats.paired_window_test(s, r, alternative="greater")["p_value"] for t, (s, r) in pairs.items()}
    claim.measure("max_p_value", float(np.max(list(p.values()))), key=True)
    claim.measure("p_value_by_type", p)
    failures = [f"{t}: p = {v:.4g} ≥ {alpha:g}" for t, v in p.items() if not math.isnan(v) and not v < alpha]
    undecided = [f"{t}: p undefined (NaN per-window difference)" for t, v in p.items() if math.isnan(v)]
    _decide(claim, failures, undecided, f"p < {alpha:g} for all {len(p)} types")
    return p


def largest_jump(claim: Claim, base_nll, super_by_type: Mapping[str, object], winner: str = "zero") -> dict:
    """ΔPPL(super) under ``winner`` exceeds that under every other perturbation type: its own CI
    above 0, and each paired difference ΔPPL(winner) − ΔPPL(other) with its CI above 0.
    super_by_type: type -> NLL. Key value: the smallest difference with its CI. Non-finite ΔPPL:
    undecided."""
    boot = stats.window_bootstrap(base_nll, dict(super_by_type))
    claim.measure("delta_ppl_super_by_type", boot.summary())
    failures, undecided, diffs = [], [], {}
    for other in (t for t in super_by_type if t != winner):
        value = boot.point[winner] - boot.point[other]
        lo, hi = stats.percentile_ci(boot.difference_samples(winner, other), boot.confidence)
        diffs[other] = (value, lo, hi)
        if not all(math.isfinite(v) for v in (value, lo, hi)):
            undecided.append(f"{winner} − {other}: non-finite ΔPPL ({value})")
        elif not lo > 0:
            failures.append(f"{winner} − {other} = {value:.4g}, CI [{lo:.4g}, {hi:.4g}] not above 0")
    low_other = min(diffs, key=lambda t: diffs[t][0] if math.isfinite(diffs[t][0]) else math.inf)
    value, lo, hi = diffs[low_other]
    claim.measure(f"difference_{winner}_minus_{low_other}", value, ci=(lo, hi), key=True)
    w_lo, w_hi = boot.ci(winner)
    if math.isfinite(w_lo) and not w_lo > 0:
        failures.insert(0, f"no damage under {winner}: ΔPPL CI [{w_lo:.4g}, {w_hi:.4g}] not above 0")
    _decide(claim, failures, undecided, f"{winner} exceeds every other type (smallest margin vs {low_other})")
    return diffs


def verdicts_agree(claim: Claim, base_nll, by_type: Mapping[str, tuple], factor: float) -> dict[str, bool]:
    """The super-vs-random verdict (dominance with ``factor``) is the same for every perturbation
    type. by_type: type -> (super NLL, random NLL). Falsified when two decided verdicts differ;
    otherwise inconclusive when any type is undecided. Key value: how many types hold."""
    verdicts, undecided = {}, []
    for t, (s, r) in by_type.items():
        d = stats.dominance(
            stats.window_bootstrap(base_nll, {"super": s, "random": r}), "super", "random", factor
        )
        claim.measure(f"{d['key']}_super_random_{t}", d["value"], ci=d["ci"])
        if d["decided"]:
            verdicts[t] = bool(d["holds"])
        else:
            undecided.append(f"{t}: {d['reason']}")
    claim.measure("types_holding", sum(verdicts.values()), key=True)
    claim.measure("verdict_by_type", verdicts)
    failures = [] if len(set(verdicts.values())) <= 1 else [f"verdicts differ across types: {verdicts}"]
    _decide(
        claim,
        failures,
        undecided,
        f"all {len(verdicts)} types agree: super ≥ {factor:g}x random is {next(iter(verdicts.values()), None)}",
    )
    return verdicts


def restored_exactly(claim: Claim, verified: Sequence[bool], sha256_equal: bool) -> None:
    """Every perturbation was undone bit-exactly: each restore verified and the weights' sha256
    equal to the loaded one. Key value: the number of conditions."""
    claim.measure("conditions", len(verified), key=True)
    claim.measure("all_verified", all(verified))
    claim.measure("sha256_equal", bool(sha256_equal))
    claim.check(all(verified) and sha256_equal, "weights differ from the loaded ones")


def restored_to_baseline(
    claim: Claim, verified: Sequence[bool], sha256_equal: bool, ppl_after: float, ppl_base: float
) -> None:
    """As `restored_exactly`, and the perplexity after restoring equals the baseline's exactly."""
    claim.measure("ppl_after_restore", ppl_after)
    claim.measure("baseline_ppl", ppl_base)
    claim.check(all(verified) and sha256_equal, "weights not restored bit-exactly")
    claim.require_finite(ppl_after_restore=ppl_after, baseline_ppl=ppl_base)
    claim.check(ppl_after == ppl_base, f"PPL after restore {ppl_after!r} != baseline {ppl_base!r}")
