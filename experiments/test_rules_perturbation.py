"""Unit tests of the phase-3 decision rules (rules_perturbation.py) on synthetic per-window NLL:
for every rule a case where it must hold, one where it must be falsified and, where non-finite
input exists, one where it must be inconclusive. Not claims: no model, no ``claim`` fixture.

Synthetic windows: W = 16 base NLLs near 3 (PPL ≈ 20); a perturbed model is the base plus a shift
per window (ΔNLL), so ΔPPL ≈ 20·(e^shift − 1).
"""

import math

import numpy as np
import pytest
import rules_perturbation as rules
from hypothesis import given, settings
from hypothesis import strategies as st
from verdicts import FALSIFIED, HOLDS, INCONCLUSIVE, verdict

W, S = 16, 3
BASE = 3.0 + 0.3 * np.random.default_rng(0).standard_normal(W)
FAST = settings(max_examples=25, deadline=None)


def shifted(delta: float, noise: float = 0.002, seed: int = 1) -> np.ndarray:
    """[S, W] NLL: the base shifted by ``delta`` plus Gaussian noise of sd ``noise``."""
    return BASE + delta + noise * np.random.default_rng(seed).standard_normal((S, W))


def overflowed(delta: float = 0.1, windows=(0,)) -> np.ndarray:
    x = shifted(delta)
    x[:, list(windows)] = math.inf
    return x


# --- dominates: ΔPPL(num) ≥ factor × ΔPPL(den) ------------------------------------------------
@pytest.mark.parametrize(
    ("num", "den", "expected", "key"),
    [
        (0.5, 0.01, HOLDS, "ratio_super_random"),  # ratio ≈ 65
        (0.3, -0.02, HOLDS, "difference_super_random"),  # random improved: the difference decides
        (0.02, 0.01, FALSIFIED, "ratio_super_random"),  # ratio ≈ 2 < 3
        (-0.05, -0.1, FALSIFIED, "difference_super_random"),  # "improvement" never holds
        (0.0, 0.0, FALSIFIED, None),  # no damage never holds
    ],
)
def test_dominates(num, den, expected, key):
    out, claim = verdict(rules.dominates, BASE, shifted(num), shifted(den, seed=2), 3.0)
    assert out == expected
    if key:
        assert claim.key == key


def test_dominates_inconclusive_on_overflow():
    assert verdict(rules.dominates, BASE, overflowed(0.5), shifted(0.01), 3.0)[0] == INCONCLUSIVE
    assert verdict(rules.dominates, BASE, overflowed(0.5), overflowed(0.5), 3.0)[0] == INCONCLUSIVE


@FAST
@given(
    drop=st.lists(st.floats(0.0, 0.5), min_size=W, max_size=W),
    den=st.floats(-0.5, 0.5),
    factor=st.floats(0.1, 10.0),
)
def test_dominates_never_holds_without_damage(drop, den, factor):
    """A set whose NLL is at or below the base's in every window never dominates anything."""
    num = BASE - np.asarray(drop)
    assert verdict(rules.dominates, BASE, num, shifted(den), factor)[0] != HOLDS


# --- material_damage: CI lower bound of ΔPPL(super) ≥ minimum ---------------------------------
@pytest.mark.parametrize(("delta", "expected"), [(0.5, HOLDS), (0.001, FALSIFIED), (-0.1, FALSIFIED)])
def test_material_damage(delta, expected):
    assert verdict(rules.material_damage, BASE, shifted(delta), 0.1)[0] == expected


def test_material_damage_inconclusive_on_overflow():
    assert verdict(rules.material_damage, BASE, overflowed(), 0.1)[0] == INCONCLUSIVE


def test_material_damage_uses_the_lower_bound():
    """A point estimate above the minimum with a CI reaching below it does not hold."""
    noisy = BASE + 0.006 + 0.05 * np.sign(np.arange(W) % 2 - 0.5)  # ΔPPL ≈ 0.12, wide CI
    out, claim = verdict(rules.material_damage, BASE, noisy, 0.1)
    assert claim.measured["delta_ppl_super"]["value"] > 0.1 and out == FALSIFIED


# --- paired_significant: one-sided Wilcoxon on per-window ΔNLL ---------------------------------
def test_paired_significant():
    assert verdict(rules.paired_significant, shifted(0.3), shifted(0.01, seed=2), 0.05)[0] == HOLDS
    alternating = shifted(0.01) + 0.05 * np.sign(np.arange(W) % 2 - 0.5)
    assert verdict(rules.paired_significant, alternating, shifted(0.01), 0.05)[0] == FALSIFIED
    assert verdict(rules.paired_significant, shifted(0.01), shifted(0.3), 0.05)[0] == FALSIFIED


def test_paired_significant_inconclusive_on_nan():
    assert verdict(rules.paired_significant, overflowed(), overflowed(), 0.05)[0] == INCONCLUSIVE


# --- beyond_null: empirical p of the super set against random sets ------------------------------
NULL = np.random.default_rng(3).uniform(0.0, 1.0, 20)


def test_beyond_null():
    assert verdict(rules.beyond_null, [10.0, 12.0, 11.0], NULL, 0.05)[0] == HOLDS
    assert verdict(rules.beyond_null, [math.inf, 12.0, 11.0], NULL, 0.05)[0] == HOLDS  # inf vs finite
    tied = NULL.copy()
    tied[5] = 10.0  # one random set as damaging as seed 0's super set: p = 2/21
    out, claim = verdict(rules.beyond_null, [10.0, 12.0, 11.0], tied, 0.05)
    assert out == FALSIFIED and claim.measured["max_p_value"]["value"] == pytest.approx(2 / 21)
    assert claim.measured["p_value_per_seed"]["value"][1] == pytest.approx(1 / 21)  # seed 1 still beyond


def test_beyond_null_inconclusive():
    for i in (0, 19):  # wherever the NaN is (a builtin max would skip a NaN after the first)
        with_nan = NULL.copy()
        with_nan[i] = math.nan
        assert verdict(rules.beyond_null, [10.0, 12.0, 11.0], with_nan, 0.05)[0] == INCONCLUSIVE
    with_inf = NULL.copy()
    with_inf[3] = math.inf
    assert verdict(rules.beyond_null, [math.inf, 12.0, 11.0], with_inf, 0.05)[0] == INCONCLUSIVE


@FAST
@given(
    observed=st.lists(st.floats(-5, 5), min_size=S, max_size=S),
    null=st.lists(st.floats(-5, 5), min_size=20, max_size=20),
)
def test_beyond_null_holds_iff_every_seed_beats_all_sets(observed, null):
    """With 20 random sets, p < 0.05 means no random set reaches any seed's super set."""
    expected = all(o > max(null) for o in observed)
    assert (verdict(rules.beyond_null, observed, null, 0.05)[0] == HOLDS) == expected


# --- dose_monotonic: Spearman ρ > 0, p < alpha, top dose's CI above 0 ---------------------------
DOSES = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08)


def dose_series(effects, noise=0.002):
    return [BASE if d == 0 else shifted(e, noise, seed=i) for i, (d, e) in enumerate(zip(DOSES, effects))]


def test_dose_monotonic():
    rising = dose_series([0.0, 0.01, 0.02, 0.05, 0.1, 0.3])
    assert verdict(rules.dose_monotonic, DOSES, BASE, rising, 0.05)[0] == HOLDS
    flat = dose_series([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], noise=0.01)
    assert verdict(rules.dose_monotonic, DOSES, BASE, flat, 0.05)[0] == FALSIFIED


def test_dose_monotonic_noise_level_is_no_evidence():
    """Strictly increasing points at noise level: the top dose's CI reaches 0, so it is falsified."""
    wiggle = 0.05 * np.sign(np.arange(W) % 2 - 0.5)  # mean 0 over all windows, large per window
    series = [BASE] + [BASE + 1e-6 * (i + 1) + wiggle for i in range(5)]
    out, claim = verdict(rules.dose_monotonic, DOSES, BASE, series, 0.05)
    assert claim.measured["spearman_rho"]["value"] == pytest.approx(1.0) and out == FALSIFIED


def test_dose_monotonic_inconclusive_on_overflow():
    series = dose_series([0.0, 0.01, 0.02, 0.05, 0.1, 0.3])
    series[-1] = overflowed()
    assert verdict(rules.dose_monotonic, DOSES, BASE, series, 0.05)[0] == INCONCLUSIVE


@FAST
@given(effects=st.lists(st.floats(0.0, 0.5), min_size=5, max_size=5, unique=True))
def test_dose_monotonic_falsified_when_decreasing(effects):
    series = dose_series([0.0, *sorted(effects, reverse=True)])
    assert verdict(rules.dose_monotonic, DOSES, BASE, series, 0.05)[0] == FALSIFIED


# --- hierarchy_kept: super ≥ 3× random ≥ 3× bottom at every dose -------------------------------
def dose_sets(super_, random, bottom):
    return {"super": shifted(super_), "random": shifted(random, seed=2), "bottom": shifted(bottom, seed=3)}


def test_hierarchy_kept():
    good = {0.01: dose_sets(0.5, 0.05, 0.005), 0.02: dose_sets(0.8, 0.1, 0.01)}
    out, claim = verdict(rules.hierarchy_kept, BASE, good, (3.0, 3.0))
    assert out == HOLDS and claim.measured["scales_kept"]["value"] == 2
    bad = {0.01: dose_sets(0.5, 0.05, 0.05), 0.02: dose_sets(0.8, 0.1, 0.01)}  # random = bottom
    assert verdict(rules.hierarchy_kept, BASE, bad, (3.0, 3.0))[0] == FALSIFIED
    undecided = {
        0.01: {**dose_sets(0.5, 0.05, 0.005), "random": overflowed()},
        0.02: dose_sets(0.8, 0.1, 0.01),
    }
    assert verdict(rules.hierarchy_kept, BASE, undecided, (3.0, 3.0))[0] == INCONCLUSIVE


# --- all_significant: p < alpha for every perturbation type ------------------------------------
def test_all_significant():
    good = {t: (shifted(0.3), shifted(0.01, seed=2)) for t in ("zero", "sign_flip", "bit_flip")}
    assert verdict(rules.all_significant, good, 0.01)[0] == HOLDS
    weak = {**good, "gauss_noise": (shifted(0.01), shifted(0.01, seed=2))}
    out, claim = verdict(rules.all_significant, weak, 0.01)
    assert out == FALSIFIED and claim.measured["max_p_value"]["value"] >= 0.01
    undefined = {**good, "bit_flip": (overflowed(), overflowed())}
    assert verdict(rules.all_significant, undefined, 0.01)[0] == INCONCLUSIVE


# --- largest_jump: zeroing beats every other type ----------------------------------------------
def by_type(zero, sign, gauss, bit):
    return {
        "zero": shifted(zero),
        "sign_flip": shifted(sign, seed=2),
        "gauss_noise": shifted(gauss, seed=3),
        "bit_flip": bit,
    }


def test_largest_jump():
    assert verdict(rules.largest_jump, BASE, by_type(0.5, 0.2, 0.01, shifted(0.1, seed=4)))[0] == HOLDS
    assert verdict(rules.largest_jump, BASE, by_type(0.5, 0.7, 0.01, shifted(0.1, seed=4)))[0] == FALSIFIED
    nothing = by_type(-0.01, -0.02, -0.03, shifted(-0.04, seed=4))  # zero "largest" but no damage
    assert verdict(rules.largest_jump, BASE, nothing)[0] == FALSIFIED
    out, claim = verdict(rules.largest_jump, BASE, by_type(0.5, 0.2, 0.01, overflowed()))
    assert out == INCONCLUSIVE and claim.key == "difference_zero_minus_sign_flip"  # smallest finite margin


# --- verdicts_agree: the super-vs-random verdict is the same for every type --------------------
def pairs(*ratios_hold):
    return {
        t: (shifted(0.5 if ok else 0.02), shifted(0.01, seed=2))
        for t, ok in zip(("zero", "sign_flip", "gauss_noise", "bit_flip"), ratios_hold)
    }


def test_verdicts_agree():
    out, claim = verdict(rules.verdicts_agree, BASE, pairs(True, True, True, True), 3.0)
    assert out == HOLDS and claim.measured["types_holding"]["value"] == 4
    assert verdict(rules.verdicts_agree, BASE, pairs(False, False, False, False), 3.0)[0] == HOLDS
    assert verdict(rules.verdicts_agree, BASE, pairs(True, False, True, True), 3.0)[0] == FALSIFIED
    undecided = {**pairs(True, True, True, True), "bit_flip": (overflowed(), overflowed())}
    assert verdict(rules.verdicts_agree, BASE, undecided, 3.0)[0] == INCONCLUSIVE


# --- restore rules --------------------------------------------------------------------------
def test_restored_exactly():
    assert verdict(rules.restored_exactly, [True, True], True)[0] == HOLDS
    assert verdict(rules.restored_exactly, [True, False], True)[0] == FALSIFIED
    assert verdict(rules.restored_exactly, [True, True], False)[0] == FALSIFIED


def test_restored_to_baseline():
    assert verdict(rules.restored_to_baseline, [True], True, 20.5, 20.5)[0] == HOLDS
    assert verdict(rules.restored_to_baseline, [True], True, 20.5000001, 20.5)[0] == FALSIFIED
    assert verdict(rules.restored_to_baseline, [False], True, 20.5, 20.5)[0] == FALSIFIED
    assert verdict(rules.restored_to_baseline, [True], True, math.nan, math.nan)[0] == INCONCLUSIVE
