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


# --- windows: paired bootstrap of ΔPPL, dominance, Wilcoxon on windows, empirical p-value ---

NLL = st.floats(1.0, 5.0)


def _direct_delta_ppl(base, cond) -> float:
    """ΔPPL = mean over seeds of exp(mean_w cond[s]) − exp(mean_w base), in plain Python."""
    rows = [cond] if np.ndim(cond) == 1 else list(cond)
    base_ppl = math.exp(sum(base) / len(base))
    return sum(math.exp(sum(r) / len(r)) - base_ppl for r in rows) / len(rows)


def _boot(base, n_resamples=1000, **conds):
    return stats.window_bootstrap(base, conds, n_resamples=n_resamples, seed=0)


def _plain(value) -> bool:
    if isinstance(value, list):
        return all(type(v) is float for v in value)
    return type(value) in (bool, float, str)


@SETTINGS
@given(
    st.integers(1, 12).flatmap(
        lambda w: st.tuples(
            st.lists(NLL, min_size=w, max_size=w),
            st.integers(1, 3).flatmap(
                lambda s: st.lists(st.lists(NLL, min_size=w, max_size=w), min_size=s, max_size=s)
            ),
        )
    )
)
def test_window_bootstrap_point_is_the_delta_ppl_formula(data):
    base, cond = data
    boot = stats.window_bootstrap(base, {"c": cond, "first": cond[0]}, n_resamples=50)
    assert boot.point["c"] == pytest.approx(_direct_delta_ppl(base, cond), rel=1e-12, abs=1e-12)
    assert boot.point["first"] == pytest.approx(_direct_delta_ppl(base, cond[0]), rel=1e-12, abs=1e-12)
    assert type(boot.point["c"]) is float and boot.samples["c"].shape == (50,)
    assert boot.indices.shape == (50, len(base)) and boot.n_windows == len(base)


@SETTINGS
@given(st.lists(NLL, min_size=2, max_size=30), st.floats(-0.5, 0.5), st.integers(0, 1000))
def test_window_bootstrap_is_paired(base, c, seed):
    base = np.asarray(base)
    boot = stats.window_bootstrap(base, {"shift": base + c, "same": base}, n_resamples=200, seed=seed)
    resampled = base[boot.indices].mean(axis=1)  # the same windows for base and every condition
    expected = np.exp(resampled + c) - np.exp(resampled)
    np.testing.assert_allclose(boot.samples["shift"], expected, rtol=1e-9, atol=1e-12)
    assert np.all(boot.samples["same"] == 0.0)
    if abs(c) > 1e-6:  # paired: every resample has the sign of the shift
        assert np.all(np.sign(boot.samples["shift"]) == np.sign(c))


def test_window_bootstrap_is_seeded_and_validates():
    base = np.linspace(2, 3, 20)
    a, b = _boot(base, x=base + 0.1), _boot(base, x=base + 0.1)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.samples["x"], b.samples["x"])
    low, high = a.ci("x")
    assert low <= a.point["x"] <= high and a.summary()["x"] == {"point": a.point["x"], "ci": [low, high]}
    for bad in ({"x": base[:5]}, {"x": np.ones((2, 3, 20))}):
        with pytest.raises(ConfigError, match="must be"):
            stats.window_bootstrap(base, bad)
    with pytest.raises(ConfigError, match="base_nll"):
        stats.window_bootstrap([], {})
    with pytest.raises(ConfigError, match="confidence"):
        stats.window_bootstrap(base, {}, confidence=1.0)


def test_percentile_ci_is_inf_safe():
    assert stats.percentile_ci([1.0, 2.0, math.inf, math.inf], 0.5) == (1.0, math.inf)
    assert stats.percentile_ci([4.0] * 10) == (4.0, 4.0)
    assert all(math.isnan(v) for v in stats.percentile_ci([]))


def _noisy(rng, base, shift, sd=0.02):
    return base + shift + rng.normal(0, sd, base.size)


@pytest.fixture
def windows():
    rng = np.random.default_rng(0)
    return rng, rng.normal(3.0, 0.4, 200)


def test_dominance_holds_on_a_clear_ten_fold_ratio(windows):
    rng, base = windows
    boot = _boot(base, num=_noisy(rng, base, 0.2), den=_noisy(rng, base, 0.015))
    d = stats.dominance(boot, "num", "den", 10.0)
    assert d["decided"] and d["holds"] and d["key"] == "ratio" and d["value"] >= 10.0
    assert d["num_ci"][0] > 0 and d["ci"][0] <= d["value"] <= d["ci"][1]
    assert d["value"] == pytest.approx(d["num_point"] / d["den_point"])
    assert all(_plain(v) for v in d.values()), d
    too_much = stats.dominance(boot, "num", "den", 100.0)
    assert too_much["decided"] and not too_much["holds"] and "<" in too_much["reason"]


def test_dominance_never_holds_without_damage(windows):
    rng, base = windows
    boot = _boot(
        base, same=base.copy(), noise=_noisy(rng, base, 0.0, 0.05), better=base - 0.05, tiny=base + 1e-4
    )
    for num in ("same", "noise", "better"):
        d = stats.dominance(boot, num, "tiny", 3.0)  # a tiny positive den makes any ratio "large"
        assert d["decided"] and not d["holds"] and d["key"] == "ratio", (num, d)
        assert d["num_ci"][0] <= 0 and "no significant damage" in d["reason"]


def test_dominance_ci_touching_zero_fails_even_with_a_large_ratio(windows):
    rng, base = windows
    noise = rng.normal(0, 0.1, base.size)
    boot = _boot(base, num=base + 0.004 + noise - noise.mean(), den=base + 1e-4)  # point ratio ≈ 40
    d = stats.dominance(boot, "num", "den", 3.0)
    assert d["value"] >= 3.0 and d["num_ci"][0] <= 0 < d["num_point"]  # the scenario under test
    assert d["decided"] and not d["holds"]


def test_dominance_uses_the_difference_when_den_is_not_positive(windows):
    rng, base = windows
    boot = _boot(
        base,
        num=_noisy(rng, base, 0.1),
        better=base - 0.01,
        zero=base.copy(),
        noise=_noisy(rng, base, 0.0, 0.05),
    )
    for den in ("better", "zero"):
        d = stats.dominance(boot, "num", den, 5.0)
        assert d["key"] == "difference" and d["decided"] and d["holds"], d
        assert d["value"] == pytest.approx(d["num_point"] - d["den_point"]) and d["ci"][0] > 0
    worse = stats.dominance(boot, "better", "zero", 5.0)  # improvement vs nothing: key -0.x, never holds
    assert worse["key"] == "difference" and not worse["holds"] and worse["value"] < 0


def test_dominance_identical_conditions_have_ratio_one(windows):
    rng, base = windows
    cond = _noisy(rng, base, 0.1)
    d = stats.dominance(_boot(base, a=cond, b=cond.copy()), "a", "b", 1.0)
    assert d["value"] == 1.0 and d["ci"] == [1.0, 1.0] and d["holds"]
    assert not stats.dominance(_boot(base, a=cond, b=cond.copy()), "a", "b", 2.0)["holds"]


def test_dominance_undecided_on_one_window_and_non_finite(windows):
    _, base = windows
    one = _boot(base[:1], num=base[:1] + 1.0, den=base[:1] + 0.01)
    assert one.ci("num") == (one.point["num"],) * 2
    d = stats.dominance(one, "num", "den", 3.0)
    assert not d["decided"] and not d["holds"] and "one evaluation window" in d["reason"]
    inf_window = base + 0.1
    inf_window[7] = math.inf
    boot = _boot(base, inf=inf_window, overflow=base + 1000.0, den=base + 0.01, nan=base * math.nan)
    for num, den in (
        ("inf", "den"),
        ("overflow", "den"),
        ("den", "inf"),
        ("inf", "overflow"),
        ("nan", "den"),
    ):
        d = stats.dominance(boot, num, den, 3.0)
        assert not d["decided"] and not d["holds"] and "non-finite" in d["reason"], (num, den, d)
        assert all(_plain(v) for v in d.values()), d
    assert boot.point["inf"] == math.inf and math.isnan(boot.point["nan"])
    with pytest.raises(ConfigError, match="factor"):
        stats.dominance(boot, "den", "den", math.nan)


@SETTINGS
@given(
    st.lists(NLL, min_size=2, max_size=25),
    st.lists(st.floats(-0.3, 0.3), min_size=50, max_size=50),
    st.floats(0.5, 20.0),
)
def test_dominance_rule_properties(base, shifts, factor):
    base = np.asarray(base)
    w = base.size
    num, den = base + np.asarray(shifts[:w]), base + np.asarray(shifts[25 : 25 + w])
    boot = stats.window_bootstrap(
        base, {"num": num, "den": den, "better": np.minimum(num, base)}, n_resamples=200
    )
    d = stats.dominance(boot, "num", "den", factor)
    assert d["key"] == ("ratio" if d["den_point"] > 0 else "difference")
    if d["holds"]:
        assert d["decided"] and d["num_ci"][0] > 0
        assert d["value"] >= factor if d["key"] == "ratio" else d["ci"][0] > 0
    assert not stats.dominance(boot, "better", "den", factor)["holds"]  # improvement never holds


def test_paired_window_test_detects_a_shift_and_matches_scipy():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 60)
    cond = base[None, :] + 0.01 + rng.normal(0, 0.01, (3, 60))
    r = stats.paired_window_test(cond, base)
    assert r["p_value"] < 0.01 and r["n"] == 60 and r["mean_diff"] > 0 and r["ci"][0] > 0
    ref = sps.wilcoxon(cond.mean(axis=0) - base, alternative="greater")
    assert r["statistic"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    assert stats.paired_window_test(cond, base, alternative="less")["p_value"] > 0.99
    assert all(type(v) in (int, float, list) for v in r.values())


def test_paired_window_test_is_uniform_under_the_null():
    ps = []
    for seed in range(200):  # fixed seeds: deterministic, not a flaky threshold
        rng = np.random.default_rng(seed)
        base = rng.normal(3.0, 0.5, 30)
        ps.append(stats.paired_window_test(base + rng.normal(0, 0.01, 30), base, n_resamples=50)["p_value"])
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    assert 0.01 <= np.mean(np.asarray(ps) < 0.05) <= 0.1


def test_paired_window_test_edge_cases():
    base = np.linspace(2, 3, 10)
    same = stats.paired_window_test(base, base.copy())
    assert (same["statistic"], same["p_value"], same["mean_diff"]) == (0.0, 1.0, 0.0)
    nan = base.copy()
    nan[3] = math.nan
    assert math.isnan(stats.paired_window_test(nan, base)["p_value"])
    with pytest.raises(ConfigError, match="same windows"):
        stats.paired_window_test(base, base[:5])
    with pytest.raises(ConfigError, match="alternative"):
        stats.paired_window_test(base, base, alternative="bigger")


@SETTINGS
@given(
    st.floats(-10, 10),
    st.lists(st.floats(-10, 10), max_size=40),
    st.sampled_from(["greater", "less", "two-sided"]),
)
def test_empirical_p_value_bounds(observed, null, alternative):
    p = stats.empirical_p_value(observed, null, alternative)
    assert type(p) is float and 1.0 / (len(null) + 1) <= p <= 1.0


def test_empirical_p_value_values():
    null = list(range(19))
    assert stats.empirical_p_value(100.0, null) == 1 / 20
    assert stats.empirical_p_value(math.inf, null) == 1 / 20  # overflowed beats every finite draw
    assert stats.empirical_p_value(-1.0, null) == 1.0
    assert stats.empirical_p_value(-1.0, null, "less") == 1 / 20
    assert stats.empirical_p_value(9.0, null) == (1 + 10) / 20
    assert stats.empirical_p_value(100.0, null, "two-sided") == 2 / 20
    assert stats.empirical_p_value(1.0, []) == 1.0
    assert math.isnan(stats.empirical_p_value(math.nan, null))
    assert math.isnan(stats.empirical_p_value(1.0, [0.0, math.nan]))
