"""Unit tests of the phase-5.3 decision rules (rules_interpret.py) on synthetic data: for every rule a
case where it must hold, one where it must be falsified and one where it must be inconclusive. Not
claims: no model, no ``claim`` fixture.

Synthetic traces: W = 8 windows, L = 12 layers, super layer 3; the residual stream entering layers
0..3 has maxima near 10, after the super layer near 10 x ``jump``.
"""

import contextlib

import numpy as np
import pytest
import rules_interpret as rules
from hypothesis import given, settings
from hypothesis import strategies as st
from verdicts import FALSIFIED, HOLDS, INCONCLUSIVE, verdict

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive

W, L, S = 8, 12, 3


def trace(jump: float, peak: int = S, spread: float = 0.05, layers: int = L, seed: int = 0):
    """down [W, L] with its maximum at ``peak``; resid [W, L + 1]: ~10 up to S, ~10 x jump after."""
    rng = np.random.default_rng(seed)
    down = 5.0 + rng.random((W, layers))
    down[:, peak] = 1000.0
    resid = 10.0 * np.exp(spread * rng.standard_normal((W, layers + 1)))
    resid[:, S + 1 :] *= jump
    return down, resid


# --- super_activation_persists -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("jump", "peak", "spread", "expected"),
    [
        (100.0, S, 0.05, HOLDS),  # 100x persistent spike at the detected layer
        (2.0, S, 0.05, FALSIFIED),  # the stream falls back: 2x < 10x
        (100.0, S + 2, 0.05, FALSIFIED),  # the largest down_proj input is elsewhere
        (10.0, S, 1.0, INCONCLUSIVE),  # noisy windows around exactly 10x: the CI straddles
    ],
)
def test_super_activation_persists(jump, peak, spread, expected):
    down, resid = trace(jump, peak, spread)
    got, claim = verdict(rules.super_activation_persists, down, resid, S, 10.0)
    assert got == expected
    assert "persistence_ratio" in claim.measured or expected == FALSIFIED


def test_super_activation_last_layer_inconclusive():
    down, resid = trace(100.0, peak=L - 1)
    assert verdict(rules.super_activation_persists, down, resid, L - 1, 10.0)[0] == INCONCLUSIVE


def test_super_activation_shapes_checked():
    with pytest.raises(ValueError):
        rules.super_activation_persists(Claim(), np.ones((W, L)), np.ones((W, L)), S, 10.0)


# --- stopword_shift ----------------------------------------------------------------------------
def masses(factor: float, noise: float = 0.01, seed: int = 1):
    rng = np.random.default_rng(seed)
    base = 0.2 + 0.02 * rng.standard_normal(W)
    return base, base * factor * np.exp(noise * rng.standard_normal(W))


@pytest.mark.parametrize(
    ("factor", "noise", "expected"),
    [(3.0, 0.01, HOLDS), (1.1, 0.01, FALSIFIED), (2.0, 0.5, INCONCLUSIVE)],
)
def test_stopword_shift(factor, noise, expected):
    got, claim = verdict(rules.stopword_shift, *masses(factor, noise), 2.0)
    assert got == expected
    assert "stopword_mass_ratio" in claim.measured


def test_stopword_shift_one_window_inconclusive():
    assert verdict(rules.stopword_shift, [0.2], [0.6], 2.0)[0] == INCONCLUSIVE


@settings(max_examples=25, deadline=None)
@given(st.floats(0.05, 20.0))
def test_stopword_ratio_is_ratio_of_means(factor):
    a, b = masses(factor, 0.0)
    claim = Claim()
    with contextlib.suppress(ClaimFalsified, ClaimInconclusive):
        rules.stopword_shift(claim, a, b, 2.0)
    assert claim.measured["stopword_mass_ratio"]["value"] == pytest.approx(factor, rel=1e-9)


# --- sink_after_super_layer --------------------------------------------------------------------
def shares(after: float, before: float, noise: float = 0.02, heads: int = 9, seed: int = 2):
    s = np.full((L, heads), before) + noise * np.random.default_rng(seed).standard_normal((L, heads))
    s[S + 1 :] += after - before
    return np.clip(s, 0, 1)


@pytest.mark.parametrize(
    ("after", "before", "noise", "expected"),
    [(0.6, 0.2, 0.02, HOLDS), (0.1, 0.5, 0.02, FALSIFIED), (0.3, 0.3, 0.2, INCONCLUSIVE)],
)
def test_sink_after_super_layer(after, before, noise, expected):
    got, claim = verdict(rules.sink_after_super_layer, shares(after, before, noise), S)
    assert got == expected
    assert "sink_share_up_to" in claim.measured


def test_sink_no_layer_after_inconclusive():
    assert verdict(rules.sink_after_super_layer, shares(0.6, 0.2), L - 1)[0] == INCONCLUSIVE


# --- heads_concentrated ------------------------------------------------------------------------
HEAD_ARGS = (0.10, 2.0, 0.01, 999, 1.0)  # top fraction, factor, alpha, null draws, min expected count


def head_counts(n: int, hot: int = 0, cells: int = 64, seed: int = 3):
    """n entries over ``cells`` equal head slices: ``hot`` of them land in the first 4 slices, the
    rest in proportion to the sizes."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n - hot, np.full(cells, 1 / cells)) + np.bincount(
        rng.integers(0, 4, hot), minlength=cells
    )
    return counts, np.full(cells, 2048)


@pytest.mark.parametrize(
    ("n", "hot", "expected"),
    [
        (640, 400, HOLDS),  # 400 of 640 entries in 4 of 64 slices
        (640, 0, FALSIFIED),  # proportional: the top 7 slices hold what chance gives them
        (30, 30, INCONCLUSIVE),  # 30 entries over 64 slices: expected 0.47 < 1
    ],
)
def test_heads_concentrated(n, hot, expected):
    got, claim = verdict(rules.heads_concentrated, *head_counts(n, hot), *HEAD_ARGS)
    assert got == expected
    assert "min_expected_count" in claim.measured


def test_heads_significant_but_weak_is_falsified():
    """Beyond the null (p small) with a large sample, but the top slices hold < 2x their share."""
    counts, sizes = head_counts(64_000, hot=1_500)
    got, claim = verdict(rules.heads_concentrated, counts, sizes, *HEAD_ARGS)
    assert got == FALSIFIED
    assert claim.measured["pvalue"]["value"] < 0.01
    assert claim.measured["top_concentration"]["value"] < 2.0


def test_heads_unequal_sizes_are_the_null():
    """Counts exactly proportional to unequal sizes (a large o slice, small q slices): no concentration."""
    sizes = np.array([1000, 1000, 1000, 1000, 4000] * 4)
    got, claim = verdict(rules.heads_concentrated, sizes // 50, sizes, *HEAD_ARGS)
    assert got == FALSIFIED
    assert claim.measured["top_concentration"]["value"] == pytest.approx(1.0)


def test_heads_projection_effect_is_no_head_role():
    """q and k slices busy, v and o nearly empty, but even across the heads of each projection: the
    per-(layer, projection) null gives that pattern, so it is falsified; one global null would not."""
    heads, groups = 8, np.repeat(np.arange(4), 8)  # q, k, v, o: 8 heads each
    counts = np.concatenate([np.full(heads, 40), np.full(heads, 40), np.full(heads, 1), np.full(heads, 1)])
    sizes = np.full(4 * heads, 4096)
    got, grouped = verdict(rules.heads_concentrated, counts, sizes, *HEAD_ARGS, groups=groups)
    assert got == FALSIFIED and grouped.measured["pvalue"]["value"] >= 0.01
    assert verdict(rules.heads_concentrated, counts, sizes, *HEAD_ARGS)[1].measured["pvalue"]["value"] < 0.01


def test_heads_one_cell_inconclusive_and_shapes_checked():
    assert verdict(rules.heads_concentrated, [50], [10], *HEAD_ARGS)[0] == INCONCLUSIVE
    with pytest.raises(ValueError):
        rules.heads_concentrated(Claim(), [1, 2], [3], *HEAD_ARGS)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=12, max_size=40), st.randoms(use_true_random=False))
def test_heads_concentration_at_least_one_and_order_free(counts, rnd):
    """R >= 1 for any counts and sizes (the densest slices hold at least their weight share); with
    equal sizes the cells' order does not change R."""
    counts = np.array(counts)
    counts[0] += 1  # at least one entry
    args = (0.10, 2.0, 0.01, 99, 0.0)
    sizes = np.array([rnd.choice([16, 32, 64]) for _ in counts])
    claim = verdict(rules.heads_concentrated, counts, sizes, *args)[1]
    assert claim.measured["top_concentration"]["value"] >= 1.0 - 1e-12
    equal = np.full(len(counts), 32)
    perm = np.array(rnd.sample(range(len(counts)), len(counts)))
    ratio = verdict(rules.heads_concentrated, counts, equal, *args)[1].measured["top_concentration"]["value"]
    permuted = verdict(rules.heads_concentrated, counts[perm], equal, *args)[1]
    assert permuted.measured["top_concentration"]["value"] == pytest.approx(ratio)
