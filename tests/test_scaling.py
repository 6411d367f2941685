"""Tests for esa.analyses.scaling: power-law fitting, exact order statistics, plots and the measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from esa.analyses import scaling
from esa.errors import ConfigError

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(
    alpha=st.floats(-2.0, 2.0),
    log_c=st.floats(-5.0, 5.0),
    sigma=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**32 - 1),
)
def test_fit_scaling_recovers_exponent(alpha, log_c, sigma, seed):
    x = np.geomspace(1e4, 1e7, 8)
    noise = np.random.default_rng(seed).uniform(-sigma, sigma, x.size)  # bounded, in log space
    y = np.exp(log_c + alpha * np.log(x) + noise)
    fit = scaling.fit_scaling(list(zip(x, y)), n_boot=50, seed=seed)
    # |slope error| <= sigma * sum|dx| / sum dx^2 = 2.667 sigma / ln(x_max / x_min) for 8 even log-x
    bound = 2.7 * sigma / math.log(1e7 / 1e4) + 1e-9
    assert abs(fit["alpha"] - alpha) <= bound
    assert fit["n"] == 8 and len(fit["loo_errors"]) == 8
    assert isinstance(fit["alpha"], float) and isinstance(fit["r2_ci"], list)
    if sigma == 0.0:
        assert fit["prefactor"] == pytest.approx(math.exp(log_c), rel=1e-6)


@pytest.mark.parametrize("alpha", [-1.3, -0.5, 0.0, 0.7, 2.0])
def test_exact_power_law_has_zero_loo_errors(alpha):
    x = [1e3, 5e3, 2e4, 1e5, 7e5]
    pts = [(xi, 3.0 * xi**alpha) for xi in reversed(x)]  # order does not matter
    fit = scaling.fit_scaling(pts, n_boot=100)
    assert fit["x"] == sorted(x)
    assert max(abs(e) for e in fit["loo_errors"]) < 1e-9
    assert fit["loo_max_abs"] < 1e-9
    big = fit["largest_from_others"]
    assert big["x"] == 7e5 and abs(big["rel_error"]) < 1e-9
    assert big["predicted"] == pytest.approx(big["actual"], rel=1e-9)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    if alpha != 0.0:
        assert fit["r2"] == pytest.approx(1.0)


def test_loo_errors_detect_an_outlier():
    pts = [(1e3, 1.0), (1e4, 10.0), (1e5, 100.0), (1e6, 3000.0)]
    fit = scaling.fit_scaling(pts, n_boot=0)
    assert fit["largest_from_others"]["rel_error"] == pytest.approx(1000.0 / 3000.0 - 1.0)
    assert fit["loo_max_abs"] > 0.5


@pytest.mark.parametrize(
    "pts",
    [
        [(1, 1), (2, 2)],
        [(1, 1), (2, 0), (3, 3)],
        [(1, 1), (2, float("inf")), (3, 3)],
        [(5, 1), (5, 2), (5, 3)],
    ],
)
def test_fit_scaling_rejects_bad_points(pts):
    with pytest.raises(ConfigError):
        scaling.fit_scaling(pts, n_boot=0)


def test_plot_scaling_returns_loglog_figure():
    pts = [(1e3, 2.0), (1e4, 5.0), (1e5, 11.0), (1e6, 30.0)]
    fit = scaling.fit_scaling(pts, n_boot=50)
    fig = scaling.plot_scaling(pts, fit, labels=["a", "b", "c", "d"], ylabel="concentration")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert any("α" in t.get_text() for t in ax.texts)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4), seed=st.integers(0, 1000), ties=st.booleans()
)
def test_order_statistics_match_numpy(sizes, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for i, n in enumerate(sizes):
        t = torch.rand(n, generator=gen) * 10 ** torch.randint(-6, 3, (n,), generator=gen).float()
        if ties:
            t = torch.round(t * 4) / 4
        scores[f"t{i}"] = t.abs()
    allv = np.concatenate([s.numpy() for s in scores.values()]).astype(np.float64)
    desc = np.sort(allv)[::-1]
    for k in {1, len(allv), (len(allv) + 1) // 2}:
        assert scaling._kth_largest(scores, k) == pytest.approx(desc[k - 1], rel=0, abs=0)
    d = scaling._concentration(scores, 0.1)
    k = max(1, math.ceil(0.1 * allv.size))
    med = float(np.median(allv.astype(np.float32)))
    assert d["median"] == pytest.approx(med, rel=1e-6)
    assert d["top_mean"] == pytest.approx(float(desc[:k].mean()), rel=1e-6)


def test_scores_must_be_finite_and_non_negative():
    with pytest.raises(ConfigError):
        scaling._check_scores({"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ConfigError):
        scaling._check_scores({"a": torch.tensor([1.0, -2.0])})


def test_unknown_measure_is_rejected():
    with pytest.raises(ConfigError):
        scaling.measure_model(None, None, "bogus")


# --- the measures on the smallest trained family member -------------------------------------


@pytest.fixture(scope="module")
def smallest():
    from esa.data import prepare_data
    from esa.metrics.registry import compute_scores
    from esa.models import load_model
    from esa.models.family import family_names

    names = family_names()
    if not names:
        pytest.skip("fixtures/scaling/family.json is absent")
    lm = load_model(names[0], dtype="fp32", device="cpu")
    eval_file = scaling.DEFAULT_EVAL if scaling.DEFAULT_EVAL.is_file() else None
    calib_file = scaling.DEFAULT_CALIB if scaling.DEFAULT_CALIB.is_file() else None
    # 4 windows x 128 tokens for evaluation and calibration: with fewer tokens the top-1% zeroing
    # of this tiny model can *lower* the PPL (|w*g| ranks by first-order magnitude, not sign)
    data = prepare_data(lm.tokenizer, eval_file, calib_file, max_length=128, max_samples=4)
    scores = compute_scores(lm, "grad_x_weight", data.calibration(4, 0), progress=False)
    return lm, data, scores


@pytest.mark.parametrize("measure", scaling.MEASURES)
def test_measure_model_is_finite_on_smallest_member(smallest, measure):
    lm, data, _ = smallest
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    value = scaling.measure_model(lm, data, measure, n_calib=4)
    assert isinstance(value, float) and math.isfinite(value) and value > 0
    for n, p in lm.model.named_parameters():  # every perturbation was restored
        assert torch.equal(p, before[n])


def test_weights_to_double_is_the_first_doubling_k(smallest):
    lm, data, scores = smallest
    res = scaling.measure_all(lm, data, ["weights_to_double"], scores=scores)
    d = res["details"]["weights_to_double"]
    k = int(res["weights_to_double"])
    ppl = dict((int(a), b) for a, b in d["path"])
    assert ppl[k] >= 2.0 * res["baseline_ppl"]
    if k > 1:
        assert ppl[k - 1] < 2.0 * res["baseline_ppl"]
    assert 1 <= k <= res["n_scored"]


def test_fraction_to_double_is_the_count_over_the_scored_weights(smallest, monkeypatch):
    lm, data, scores = smallest
    calls = []
    search = scaling._weights_to_double
    monkeypatch.setattr(scaling, "_weights_to_double", lambda *a, **k: calls.append(1) or search(*a, **k))
    res = scaling.measure_all(lm, data, ["fraction_to_double", "weights_to_double"], scores=scores)
    assert len(calls) == 1  # one search serves both measures
    assert res["fraction_to_double"] == res["weights_to_double"] / res["n_scored"]
    assert 0 < res["fraction_to_double"] <= 1
    assert res["details"]["fraction_to_double"]["weights_to_double"] == res["weights_to_double"]


def test_every_measure_names_its_quantity():
    assert set(scaling.QUANTITIES) == set(scaling.MEASURES)
    assert all(isinstance(q, str) and q for q in scaling.QUANTITIES.values())


def test_measure_all_shares_scores_and_is_deterministic(smallest):
    lm, data, scores = smallest
    a = scaling.measure_all(lm, data, ["concentration", "super_random_ratio"], scores=scores)
    b = scaling.measure_all(lm, data, ["concentration", "super_random_ratio"], scores=scores)
    assert a["concentration"] == b["concentration"]
    assert a["super_random_ratio"] == b["super_random_ratio"]
    assert a["details"]["concentration"]["n"] == sum(s.numel() for s in scores.values())
    sr = a["details"]["super_random_ratio"]
    assert sr["k_total"] == sum(max(1, round(1e-2 * s.numel())) for s in scores.values())
    assert a["super_random_ratio"] == pytest.approx(sr["delta_ppl_top"] / sr["delta_ppl_random_mean"])


def test_super_random_ratio_without_random_damage_is_inf(monkeypatch):
    ppls = iter([12.0, 9.0, 10.0])  # top, then two random draws; baseline 10
    monkeypatch.setattr(scaling, "_ppl_zeroed", lambda *a, **k: next(ppls))
    scores = {"w": torch.arange(1.0, 201.0).reshape(10, 20)}
    d = scaling._super_random_ratio(None, None, scores, 10.0, 1e-2, 2, 0, 4)
    assert d["value"] == math.inf and d["delta_ppl_random_mean"] == -0.5 and d["k_total"] == 2
