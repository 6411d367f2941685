"""Phase 3 — perturbation: damaging the top-k ("super") weights hurts far more than random
weights, random more than bottom-k, significantly, with a monotonic dose response; every
perturbation is undone bit-exactly.

Non-finite perplexity after a perturbation (NaN/inf: the model's outputs overflowed) is recorded
as such and counts as unbounded damage (+inf) in comparisons; inf vs inf proves no ordering.
"A >= 3x B" means A's damage is positive and at least 3x B's damage (a negative ΔPPL is no damage).
"""

import math

import pytest
from criteria import (
    DOSE_SCALES,
    MIN_SUPER_DAMAGE,
    P_VALUE,
    PERTURBATIONS,
    RANDOM_VS_BOTTOM,
    SUPER_VS_RANDOM,
)

from esa import plots, stats
from esa.claims.workbench import Condition

pytestmark = [pytest.mark.phase3, pytest.mark.smoke]
KINDS = {"super": "top", "random": "random", "bottom": "bottom"}


def _damage(row: dict) -> float:
    return row["delta_ppl"] if math.isfinite(row["delta_ppl"]) else math.inf


def deltas(workbench, model, metric, perturbation, kind, scale=None) -> list[float]:
    """ΔPPL per seed (non-finite -> +inf) for one set kind (``scale=None``: the perturbation's
    registered default, e.g. gauss_noise σ = 0.01 x |w|)."""
    return [
        _damage(workbench.perturbed_eval(model, Condition(metric, s, KINDS[kind], perturbation, scale=scale)))
        for s in workbench.tier.seeds
    ]


def at_least(a: float, factor: float, b: float) -> bool:
    """Damage ``a`` is at least ``factor`` x damage ``b``: a > 0 and a >= factor * max(b, 0).

    No damage (a <= 0) never dominates; a negative ΔPPL counts as no damage; inf vs inf proves
    nothing (False)."""
    if math.isinf(a) and math.isinf(b):
        return False
    return a > 0 and a >= factor * max(b, 0.0)


def _mean(values):
    return sum(values) / len(values)


def _measure_sets(claim, sets):
    for kind, values in sets.items():
        claim.measure(f"delta_ppl_{kind}", _mean(values), ci=stats.bootstrap_ci(values))
        claim.measure(f"delta_ppl_{kind}_per_seed", values)


def test_super_beats_random(claim, workbench, model, metric, perturbation, zeroshot_examples):
    """ΔPPL(super) >= 3x ΔPPL(random)."""
    sets = {k: deltas(workbench, model, metric, perturbation, k) for k in ("super", "random", "bottom")}
    seed0 = workbench.tier.seeds[0]
    zs_base = workbench.zeroshot(model, zeroshot_examples)
    zs_super = workbench.zeroshot(model, zeroshot_examples, Condition(metric, seed0, "top", perturbation))
    claim.measure("zeroshot_acc_baseline", {t: r["acc"] for t, r in zs_base.items()})
    claim.measure(f"zeroshot_acc_super_seed{seed0}", {t: r["acc"] for t, r in zs_super.items()})
    s, r = _mean(sets["super"]), _mean(sets["random"])
    claim(threshold=SUPER_VS_RANDOM).context(
        model=model,
        metric=metric,
        perturbation=perturbation,
        seeds=list(workbench.tier.seeds),
        k=workbench.tier.topk,
    )
    claim.measure("ratio_super_random", stats.effect_ratio(sets["super"], sets["random"]), key=True)
    _measure_sets(claim, sets)
    claim.figure(
        plots.plot_delta_ppl_bars(sets, f"{perturbation}: ΔPPL by set ({model}, {metric})"),
        "ΔPPL per set with 95% CI",
    )
    claim.check(at_least(s, SUPER_VS_RANDOM, r), f"ΔPPL super {s:.4g} < {SUPER_VS_RANDOM} x random {r:.4g}")


def test_random_beats_bottom(claim, workbench, model, metric, perturbation):
    """ΔPPL(random) >= 3x ΔPPL(bottom)."""
    sets = {k: deltas(workbench, model, metric, perturbation, k) for k in ("random", "bottom")}
    r, b = _mean(sets["random"]), _mean(sets["bottom"])
    claim(threshold=RANDOM_VS_BOTTOM).context(
        model=model,
        metric=metric,
        perturbation=perturbation,
        seeds=list(workbench.tier.seeds),
        k=workbench.tier.topk,
    )
    claim.measure("ratio_random_bottom", stats.effect_ratio(sets["random"], sets["bottom"]), key=True)
    _measure_sets(claim, sets)
    claim.check(
        at_least(r, RANDOM_VS_BOTTOM, b), f"ΔPPL random {r:.4g} < {RANDOM_VS_BOTTOM} x bottom {b:.4g}"
    )


def test_super_damage_material(claim, workbench, model, metric, perturbation):
    """Perturbing the super set raises perplexity by at least 0.1."""
    values = deltas(workbench, model, metric, perturbation, "super")
    claim(threshold=MIN_SUPER_DAMAGE).context(
        model=model,
        metric=metric,
        perturbation=perturbation,
        seeds=list(workbench.tier.seeds),
        k=workbench.tier.topk,
    )
    claim.measure("delta_ppl_super", _mean(values), ci=stats.bootstrap_ci(values), key=True)
    claim.expect(_mean(values), ">=", MIN_SUPER_DAMAGE)


def test_super_vs_random_significant(claim, workbench, model, metric, perturbation):
    """Super-set damage exceeds random-set damage across seeds (one-sided paired t-test, p < 0.05)."""
    sup = deltas(workbench, model, metric, perturbation, "super")
    rnd = deltas(workbench, model, metric, perturbation, "random")
    test = stats.paired_ttest(sup, rnd, alternative="greater")
    claim(threshold=P_VALUE).context(
        model=model, metric=metric, perturbation=perturbation, seeds=list(workbench.tier.seeds)
    )
    claim.measure("pvalue", test["pvalue"], key=True)
    claim.measure("t_statistic", test["statistic"])
    claim.measure("n_seeds", test["n"])
    claim.check(math.isfinite(test["pvalue"]), "t-test undefined (non-finite ΔPPL or too few seeds)")
    claim.expect(test["pvalue"], "<", P_VALUE, name="pvalue")


def _dose(workbench, model, metric):
    return {
        kind: [_mean(deltas(workbench, model, metric, "gauss_noise", kind, scale)) for scale in DOSE_SCALES]
        for kind in ("super", "random", "bottom")
    }


def test_dose_response_monotonic(claim, workbench, model, metric):
    """ΔPPL(super) increases strictly with the gauss_noise scale (0.005 ... 0.1)."""
    series = _dose(workbench, model, metric)
    mono = stats.spearman_monotonic(list(DOSE_SCALES), series["super"])
    claim(threshold="strictly increasing").context(
        model=model,
        metric=metric,
        perturbation="gauss_noise",
        seeds=list(workbench.tier.seeds),
        scales=list(DOSE_SCALES),
    )
    claim.measure("spearman_rho", mono["rho"], key=True)
    claim.measure("delta_ppl_super_by_scale", series["super"])
    claim.figure(
        plots.plot_dose_response(list(DOSE_SCALES), series, f"gauss_noise dose response ({model})"),
        "mean ΔPPL vs σ/|w|",
    )
    claim.check(
        mono["strictly_increasing"], f"ΔPPL(super) by scale {series['super']} is not strictly increasing"
    )


def test_dose_hierarchy_kept(claim, workbench, model, metric):
    """At every gauss_noise scale ΔPPL(super) >= 3x random and ΔPPL(random) >= 3x bottom."""
    series = _dose(workbench, model, metric)
    links = [
        (at_least(s, SUPER_VS_RANDOM, r), at_least(r, RANDOM_VS_BOTTOM, b))
        for s, r, b in zip(series["super"], series["random"], series["bottom"])
    ]
    kept = [a and b for a, b in links]
    claim(threshold=[SUPER_VS_RANDOM, RANDOM_VS_BOTTOM]).context(
        model=model,
        metric=metric,
        perturbation="gauss_noise",
        seeds=list(workbench.tier.seeds),
        scales=list(DOSE_SCALES),
    )
    claim.measure("scales_kept", sum(kept), key=True)
    claim.measure("super_vs_random_by_scale", [a for a, _ in links])
    claim.measure("random_vs_bottom_by_scale", [b for _, b in links])
    for kind, values in series.items():
        claim.measure(f"delta_ppl_{kind}_by_scale", values)
    claim.check(all(kept), f"hierarchy kept at {sum(kept)} of {len(kept)} scales")


def test_perturbations_restored_bit_exactly(claim, workbench, model, metric):
    """After every phase-3 condition the weights are bit-identical to the loaded ones (sha256)."""
    rows = []
    for perturbation in PERTURBATIONS:
        for kind in KINDS.values():
            for seed in workbench.tier.seeds:
                rows.append(workbench.perturbed_eval(model, Condition(metric, seed, kind, perturbation)))
    same = workbench.current_sha256(model) == workbench.original_sha256(model)
    claim(threshold="sha256 equal").context(model=model, metric=metric, perturbation=list(PERTURBATIONS))
    claim.measure("conditions", len(rows), key=True)
    claim.measure("all_verified", all(r["restored"] for r in rows))
    claim.measure("sha256_equal", same)
    claim.check(all(r["restored"] for r in rows) and same, "weights differ from the loaded ones")


def test_architecture_perturb_restore(claim, workbench, arch):
    """On each architecture every perturbation of its top-k is undone bit-exactly and PPL returns
    exactly to baseline."""
    base = workbench.baseline(arch)
    rows = {p: workbench.perturbed_eval(arch, Condition("grad_x_weight", 0, "top", p)) for p in PERTURBATIONS}
    from esa.evaluate import evaluate

    again = evaluate(
        workbench.model(arch).model, workbench.data(arch).eval_ids, workbench.tier.batch_size, progress=False
    )
    same = workbench.current_sha256(arch) == workbench.original_sha256(arch)
    claim(threshold="bit-exact").context(model=arch, metric="grad_x_weight", perturbation=list(PERTURBATIONS))
    claim.measure("delta_ppl", {p: r["delta_ppl"] for p, r in rows.items()}, key=True)
    claim.measure("ppl_after_restore", again.ppl)
    claim.measure("baseline_ppl", base.ppl)
    claim.check(same and all(r["restored"] for r in rows.values()), "weights not restored bit-exactly")
    claim.check(again.ppl == base.ppl, f"PPL after restore {again.ppl!r} != baseline {base.ppl!r}")
