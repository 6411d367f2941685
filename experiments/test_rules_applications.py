"""Unit tests of the phase-5 decision rules (rules_applications.py) on synthetic data: for every
rule a case where it must hold, one where it must be falsified and, where the input allows it, one
where it must be inconclusive. Not claims: no model, no ``claim`` fixture.

Synthetic windows: W = 16 base NLLs near 3 (PPL ≈ 20); a perturbed model is the base plus a shift
per window (ΔNLL), so PPL(shifted) / PPL(base) ≈ e^shift.
"""

import contextlib
import math

import numpy as np
import pytest
import rules_applications as rules
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from verdicts import FALSIFIED, HOLDS, INCONCLUSIVE, verdict

from esa.analyses.tamper import compare_scores
from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive
from esa.claims.tiers import TIERS

W = 16
BASE = 3.0 + 0.3 * np.random.default_rng(0).standard_normal(W)


def shifted(delta: float, noise: float = 0.002, seed: int = 1) -> np.ndarray:
    """[W] NLL: the base shifted by ``delta`` plus Gaussian noise of sd ``noise``."""
    return BASE + delta + noise * np.random.default_rng(seed).standard_normal(W)


def null(n: int = 100, delta: float = 0.0, noise: float = 0.002) -> np.ndarray:
    return np.stack([shifted(delta, noise, seed=10 + i) for i in range(n)])


# --- measured_at_min_tier ---------------------------------------------------------------------
class _Item:
    def __init__(self, tier: str | None):
        self.mark = pytest.mark.min_tier(tier, reason="costly").mark if tier else None

    def get_closest_marker(self, name):
        return self.mark if name == "min_tier" else None


@pytest.mark.parametrize(
    ("marked", "run", "expected"),
    [("standard", "smoke", INCONCLUSIVE), ("standard", "standard", HOLDS), (None, "smoke", HOLDS)],
)
def test_measured_at_min_tier(marked, run, expected):
    claim = Claim("synthetic")
    try:
        rules.measured_at_min_tier(claim, _Item(marked), TIERS[run])
        got = HOLDS
    except ClaimInconclusive as e:
        got = INCONCLUSIVE
        assert "below the minimum tier standard" in str(e)
    assert got == expected


# --- beyond_single_weight_null ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("sw", "draws", "expected"),
    [
        (1.0, null(), HOLDS),  # ΔPPL ≈ 34 vs a null around 0
        (1.0, np.vstack([null(99), shifted(0.9)[None]]), FALSIFIED),  # one random weight nearly as bad
        (1.0, null(20), FALSIFIED),  # 20 draws: p ≥ 1/21 can never be < 0.01
        (0.0, null(100, delta=-0.01), FALSIFIED),  # beyond the null but no significant damage
        (math.nan, null(), INCONCLUSIVE),
    ],
)
def test_beyond_single_weight_null(sw, draws, expected):
    got, claim = verdict(rules.beyond_single_weight_null, BASE, shifted(sw), draws, 0.01, 3.0)
    assert got == expected
    assert claim.key == "p_value"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.floats(0.0, 2.0))
def test_null_p_value_floor(n, sw):
    """The empirical p is never below 1 / (N + 1): N draws cannot decide below it."""
    claim = Claim("synthetic")
    with contextlib.suppress(ClaimFalsified, ClaimInconclusive):
        rules.beyond_single_weight_null(claim, BASE, shifted(sw), null(n), 0.01, 3.0)
    assert claim.measured["p_value"]["value"] >= 1 / (n + 1) - 1e-12


# --- scale_sweep_shape ------------------------------------------------------------------------
FACTORS = (0.0, 0.5, 1.0, 2.0, 3.0)


def sweep(zero: float, two: float = 0.001, noise: float = 0.002) -> list:
    shifts = {0.0: zero, 0.5: 0.05, 1.0: 0.0, 2.0: two, 3.0: 0.02}
    return [BASE if f == 1.0 else shifted(shifts[f], noise, seed=int(10 * f) + 3) for f in FACTORS]


@pytest.mark.parametrize(
    ("nll", "expected"),
    [
        (sweep(zero=3.0), HOLDS),  # PPL x e^3 ≈ 20 at 0; flat near 1
        (sweep(zero=3.0, two=-0.05), FALSIFIED),  # factor 2 lowers PPL significantly
        (sweep(zero=1.0), FALSIFIED),  # removal raises PPL only x e ≈ 2.7 < 10
        (sweep(zero=math.log(10.0), noise=0.3), INCONCLUSIVE),  # CI of PPL(0)/PPL(1) straddles 10
    ],
)
def test_scale_sweep_shape(nll, expected):
    got, claim = verdict(rules.scale_sweep_shape, FACTORS, nll, 10.0)
    assert got == expected
    assert claim.key == "ppl_ratio_removed"


def test_scale_sweep_overflow_at_zero_is_catastrophic():
    nll = sweep(zero=3.0)
    nll[0] = nll[0].copy()
    nll[0][2] = math.inf
    assert verdict(rules.scale_sweep_shape, FACTORS, nll, 10.0)[0] == HOLDS


def test_scale_sweep_needs_factors_zero_and_one():
    with pytest.raises(ValueError, match="factors 0 and 1"):
        rules.scale_sweep_shape(Claim(), (0.5, 1.0, 2.0), [BASE, BASE, BASE], 10.0)


# --- tamper: planted_found_first / nothing_found ---------------------------------------------
def maps(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ref = {f"t{i}": torch.rand(30, 20, generator=gen) for i in range(4)}
    noise = {n: s + 0.05 * torch.rand(s.shape, generator=gen) for n, s in ref.items()}
    return ref, noise


def planted(ref, site, shift):
    out = {n: s.clone() for n, s in ref.items()}
    out[site[0]].view(-1)[site[1]] += shift
    return out


@pytest.mark.parametrize(
    ("shift", "other", "expected"),
    [(1.0, 0.0, HOLDS), (0.01, 0.0, FALSIFIED), (1.0, 2.0, FALSIFIED)],  # detected; too small; outranked
)
def test_planted_found_first(shift, other, expected):
    ref, noise = maps()
    site = ("t2", 77)
    suspect = planted(planted(ref, site, shift), ("t0", 5), other)
    report = compare_scores(ref, suspect, noise, margin=1.0, watch=[site])
    got, claim = verdict(rules.planted_found_first, report, "t2[77]", 1.0)
    assert got == expected
    assert claim.key == "planted_rank"


def test_nothing_found():
    ref, noise = maps()
    copy = {n: s.clone() for n, s in ref.items()}
    assert verdict(rules.nothing_found, compare_scores(ref, copy, noise), 1.0)[0] == HOLDS
    assert (
        verdict(rules.nothing_found, compare_scores(ref, planted(ref, ("t1", 3), 1.0), noise), 1.0)[0]
        == FALSIFIED
    )


# --- search_beats_random ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("guided", "random", "expected"),
    [
        (1, 64, HOLDS),  # exact ratio 64
        (2, None, HOLDS),  # random never failed within 1024: ratio > 512
        (4, 16, FALSIFIED),  # ratio 4
        (None, 8, FALSIFIED),  # random failed, guided never did
        (None, None, INCONCLUSIVE),
        (256, None, INCONCLUSIVE),  # ratio > 4 only: cannot decide against 10
    ],
)
def test_search_beats_random(guided, random, expected):
    got, claim = verdict(rules.search_beats_random, guided, random, 1024, 10.0)
    assert got == expected
    assert claim.key == "ratio"


# --- only_position_catastrophic ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("failing", "expected"),
    [({"exponent_msb"}, HOLDS), ({"exponent_msb", "bit 13"}, FALSIFIED), (set(), FALSIFIED)],
)
def test_only_position_catastrophic(failing, expected):
    flags = {p: p in failing for p in ["bit 0", "bit 13", "exponent_msb", "bit 15"]}
    assert verdict(rules.only_position_catastrophic, flags, "exponent_msb")[0] == expected
