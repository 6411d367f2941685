"""Tests for esa.stats: agreement with scipy, edge cases, power-law recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from esa import stats
from esa.errors import ConfigError

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(st.sets(st.integers(0, 30)), st.sets(st.integers(0, 30)))
def test_jaccard_overlap_properties(a, b):
    j = stats.jaccard(a, b)
    assert 0.0 <= j <= 1.0 and j == stats.jaccard(b, a)
    assert stats.jaccard(a, a) == 1.0
    o = stats.overlap(a, b)
    assert 0.0 <= o <= 1.0 and o == stats.overlap(b, a)
    if a and b:
        assert o >= j
    assert isinstance(j, float) and isinstance(o, float)


def test_set_edge_cases():
    assert stats.jaccard([], []) == 1.0
    assert stats.jaccard({1}, set()) == 0.0
    assert stats.overlap(set(), set()) == 1.0
    assert stats.overlap({1}, set()) == 0.0
    assert stats.overlap({1, 2}, {1, 2, 3, 4}) == 1.0
    assert stats.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_ttests_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 12), rng.normal(0.5, 2, 12)
    p = stats.paired_ttest(a, b)
    ref = sps.ttest_rel(a, b)
    assert p["statistic"] == pytest.approx(ref.statistic) and p["pvalue"] == pytest.approx(ref.pvalue)
    assert p["n"] == 12 and all(isinstance(v, (int, float)) for v in p.values())
    w = stats.welch_ttest(a, b[:9])
    ref = sps.ttest_ind(a, b[:9], equal_var=False)
    assert w["statistic"] == pytest.approx(ref.statistic) and w["pvalue"] == pytest.approx(ref.pvalue)
    assert (w["n"], w["n_a"], w["n_b"]) == (21, 12, 9)


def test_ttest_edge_cases():
    assert math.isnan(stats.paired_ttest([1.0], [2.0])["pvalue"])
    assert math.isnan(stats.welch_ttest([1.0], [2.0, 3.0])["pvalue"])
    same = stats.paired_ttest([1, 2, 3], [1, 2, 3])
    assert (same["statistic"], same["pvalue"]) == (0.0, 1.0)
    shift = stats.paired_ttest([2, 3, 4], [1, 2, 3])
    assert shift["statistic"] == math.inf and shift["pvalue"] == 0.0
    const = stats.welch_ttest([1, 1, 1], [2, 2])
    assert const["statistic"] == -math.inf and const["pvalue"] == 0.0
    assert stats.welch_ttest([5, 5], [5, 5, 5])["pvalue"] == 1.0
    with pytest.raises(ConfigError, match="equal lengths"):
        stats.paired_ttest([1, 2], [1, 2, 3])


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(10, 1, 40)
    low, high = stats.bootstrap_ci(x, n_resamples=500)
    assert low < np.mean(x) < high and high - low < 1.5
    assert isinstance(low, float) and isinstance(high, float)
    assert stats.bootstrap_ci(x, n_resamples=500, seed=3) == stats.bootstrap_ci(x, n_resamples=500, seed=3)
    med = stats.bootstrap_ci(x, stat=np.median, n_resamples=300)
    assert med[0] < med[1]
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    assert stats.bootstrap_ci([2.5]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))
    with pytest.raises(ConfigError, match="confidence"):
        stats.bootstrap_ci(x, confidence=1.5)


def test_effect_ratio():
    assert stats.effect_ratio([2, 4], [1, 1]) == 3.0
    assert stats.effect_ratio(6.0, 2.0) == 3.0
    assert stats.effect_ratio([1.0], [0.0]) == math.inf
    assert stats.effect_ratio([-1.0], [0.0]) == -math.inf
    assert math.isnan(stats.effect_ratio([0.0], [0.0]))


def test_spearman_monotonic():
    r = stats.spearman_monotonic([1, 2, 3, 4], [1, 4, 9, 16])
    assert r["rho"] == pytest.approx(1.0) and r["strictly_increasing"] is True and r["n"] == 4
    r = stats.spearman_monotonic([4, 3, 2, 1], [16, 9, 4, 1])  # unsorted x, still increasing in x
    assert r["strictly_increasing"] is True
    r = stats.spearman_monotonic([1, 2, 3, 4], [1, 3, 2, 5])
    assert r["strictly_increasing"] is False and 0 < r["rho"] < 1
    ref = sps.spearmanr([1, 2, 3, 4], [1, 3, 2, 5])
    assert r["rho"] == pytest.approx(ref.statistic) and r["pvalue"] == pytest.approx(ref.pvalue)
    assert math.isnan(stats.spearman_monotonic([1], [1])["rho"])
    assert math.isnan(stats.spearman_monotonic([1, 1, 1], [1, 2, 3])["rho"])


@settings(max_examples=20, deadline=None)
@given(st.floats(-3.0, 3.0), st.floats(1e-3, 1e3), st.integers(0, 10_000))
def test_power_law_fit_recovers_exponent(alpha, prefactor, seed):
    rng = np.random.default_rng(seed)
    x = np.logspace(0, 3, 12)
    y = prefactor * x**alpha * np.exp(rng.normal(0, 0.05, x.size))
    fit = stats.power_law_fit(x, y, n_boot=200, seed=seed)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.06)
    assert fit["prefactor"] == pytest.approx(prefactor, rel=0.25)
    assert fit["n"] == 12 and 0.0 <= fit["r2"] <= 1.0
    low, high = fit["r2_ci"]
    assert 0.0 <= low <= high <= 1.0
    if abs(alpha) > 0.5:
        assert fit["r2"] > 0.95


def test_predict_and_leave_one_out():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    y = 3.0 * x**1.5
    fit = stats.power_law_fit(x, y, n_boot=100)
    assert fit["alpha"] == pytest.approx(1.5) and fit["prefactor"] == pytest.approx(3.0)
    assert stats.predict_power_law(fit, 4.0) == pytest.approx(24.0)
    assert stats.predict_power_law(fit, [1.0, 4.0]) == pytest.approx([3.0, 24.0])
    errs = stats.leave_one_out_errors(x, y)
    assert len(errs) == 5 and max(abs(e) for e in errs) < 1e-9
    noisy = y * np.array([1.0, 1.0, 1.5, 1.0, 1.0])
    errs = stats.leave_one_out_errors(x, noisy)
    assert int(np.argmax(np.abs(errs))) == 2 and errs[2] < 0  # outlier over-shoots its prediction


def test_tiny_fit_with_degenerate_resamples_has_finite_ci():
    fit = stats.power_law_fit([1.0, 2.0, 3.0], [1.0, 2.2, 2.9], n_boot=300)
    assert all(math.isfinite(v) for v in fit["r2_ci"])


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1, 2], [1, 2], "at least 3 points"),
        ([1, 2, 0], [1, 2, 3], "x > 0 and y > 0"),
        ([1, 2, 3], [1, -2, 3], "x > 0 and y > 0"),
        ([1, 2, 3], [1, 2], "equal lengths"),
        ([2, 2, 2], [1, 2, 3], "distinct x"),
    ],
)
def test_power_law_bad_inputs(x, y, match):
    with pytest.raises(ConfigError, match=match):
        stats.power_law_fit(x, y)
