"""Unit tests of the phase 1-2 decision rules (experiments/rules_profiling.py): every rule is fed
synthetic measurements where it must hold, where it must be falsified and, where the rule has the
case, where it must be inconclusive. Plain tests (no ``claim`` fixture, no model): fast, for CI."""

import math

import numpy as np
import pytest
import rules_profiling as rules
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive
from esa.metrics import score_summary
from esa.select import select

NAN, INF = math.nan, math.inf
finite_floats = hs.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def holds(rule, *args, **kwargs) -> Claim:
    claim = Claim()
    rule(claim, *args, **kwargs)
    assert claim.checks and all(c["ok"] for c in claim.checks)
    return claim


def falsified(rule, *args, **kwargs) -> Claim:
    claim = Claim()
    with pytest.raises(ClaimFalsified):
        rule(claim, *args, **kwargs)
    return claim


def inconclusive(rule, *args, **kwargs) -> Claim:
    claim = Claim()
    with pytest.raises(ClaimInconclusive):
        rule(claim, *args, **kwargs)
    return claim


def nll(ppl: float, spread: float = 0.0, n: int = 32, seed: int = 0) -> list[float]:
    """n window NLLs around log(ppl) (uniform ± spread)."""
    rng = np.random.default_rng(seed)
    return list(math.log(ppl) + rng.uniform(-spread, spread, n))


def counts(inter, a, b) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=float) for v in (inter, a, b)], axis=1)


# -- shared decisions ------------------------------------------------------------------------------
def test_decide_three_ways():
    holds(rules.decide, "x", 0.6, (0.55, 0.65), ">", 0.5)
    falsified(rules.decide, "x", 0.4, (0.35, 0.45), ">", 0.5)
    inconclusive(rules.decide, "x", 0.52, (0.45, 0.6), ">", 0.5)
    inconclusive(rules.decide, "x", NAN, (0.4, 0.6), ">", 0.5)
    inconclusive(rules.decide, "x", 0.6, (0.55, INF), ">", 0.5)


@given(finite_floats, finite_floats, finite_floats, finite_floats)
def test_decide_follows_the_ci(a, b, c, threshold):
    lo, point, hi = sorted((a, b, c))
    claim = Claim()
    try:
        rules.decide(claim, "x", point, (lo, hi), ">=", threshold)
        verdict = "holds"
    except ClaimFalsified:
        verdict = "falsified"
    except ClaimInconclusive:
        verdict = "inconclusive"
    expected = "holds" if lo >= threshold else "falsified" if hi < threshold else "inconclusive"
    assert verdict == expected
    assert claim.key == "x" and claim.measured["x"]["ci"] == [lo, hi]


def test_decide_band_three_ways():
    holds(rules.decide_band, "x", 0.5, (0.45, 0.55), (0.4, 0.6))
    falsified(rules.decide_band, "x", 0.8, (0.7, 0.9), (0.4, 0.6))
    falsified(rules.decide_band, "x", 0.2, (0.1, 0.3), (0.4, 0.6))
    inconclusive(rules.decide_band, "x", 0.58, (0.5, 0.65), (0.4, 0.6))
    inconclusive(rules.decide_band, "x", NAN, (0.5, 0.55), (0.4, 0.6))


# -- measurements ----------------------------------------------------------------------------------
def test_ppl_with_ci_is_exp_mean_nll():
    x = nll(50.0, 0.5, n=16)
    ppl, (lo, hi) = rules.ppl_with_ci(x)
    assert ppl == pytest.approx(math.exp(np.mean(x)))
    assert lo < ppl < hi


@settings(max_examples=25, deadline=None)
@given(hs.integers(1, 5), hs.integers(1, 20), hs.integers(0, 2**16), hs.sampled_from(["per_layer", "global"]))
def test_set_ratios_match_selection(tensors, k, seed, mode):
    gen = torch.Generator().manual_seed(seed)
    scores_a = {f"t{i}": torch.rand(4, 8, generator=gen) for i in range(tensors)}
    scores_b = {n: s + 0.3 * torch.rand(4, 8, generator=gen) for n, s in scores_a.items()}
    a, b = select(scores_a, k, mode=mode), select(scores_b, k, mode=mode)
    c = rules.set_counts(a, b)
    assert rules.set_ratio_with_ci(c, "jaccard")[0] == pytest.approx(a.jaccard(b))
    point, (lo, hi) = rules.set_ratio_with_ci(c, "overlap")
    assert point == pytest.approx(a.overlap(b))
    assert lo <= point + 1e-12 and point <= hi + 1e-12


# -- phase 1 ---------------------------------------------------------------------------------------
def test_ppl_not_leaking():
    holds(rules.ppl_not_leaking, nll(1000.0, 0.3), 1.5)
    falsified(rules.ppl_not_leaking, nll(1.1, 0.01), 1.5)
    falsified(rules.ppl_not_leaking, [*nll(1000.0, 0.3, n=7), INF], 1.5)  # finiteness is claimed
    inconclusive(rules.ppl_not_leaking, nll(1.5, 0.4, n=8), 1.5)  # CI straddles 1.5
    inconclusive(rules.ppl_not_leaking, [], 1.5)


@given(hs.lists(hs.floats(0, 20, allow_nan=False), min_size=1, max_size=40))
def test_evaluation_deterministic_on_identical_windows(values):
    claim = holds(rules.evaluation_deterministic, values, list(values))
    assert claim.measured["windows_differing"]["value"] == 0


def test_evaluation_deterministic_one_ulp_falsifies():
    first = nll(30.0, 0.5, n=8)
    second = list(first)
    second[3] = math.nextafter(second[3], math.inf)
    claim = falsified(rules.evaluation_deterministic, first, second)
    assert claim.measured["windows_differing"]["value"] == 1
    falsified(rules.evaluation_deterministic, first, first[:-1])
    inconclusive(rules.evaluation_deterministic, [NAN, *first[1:]], [NAN, *first[1:]])
    inconclusive(rules.evaluation_deterministic, [], [])


def test_ppl_ci_within():
    holds(rules.ppl_ci_within, nll(30.0, 0.02, n=32), 0.05)
    claim = falsified(rules.ppl_ci_within, nll(30.0, 1.0, n=8), 0.05)
    assert claim.measured["relative_half_width"]["value"] > 0.05
    inconclusive(rules.ppl_ci_within, [*nll(30.0, 0.02, n=7), NAN], 0.05)
    inconclusive(rules.ppl_ci_within, nll(30.0, n=1), 0.05)


def test_accuracy_and_throughput():
    claim = holds(rules.accuracy_and_throughput, 0.3, 1000, 900.0)
    lo, hi = claim.measured["accuracy"]["ci"]
    assert lo < 0.3 < hi
    falsified(rules.accuracy_and_throughput, 0.0, 1000, 900.0)
    falsified(rules.accuracy_and_throughput, NAN, 1000, 900.0)
    falsified(rules.accuracy_and_throughput, 0.3, 1000, INF)
    falsified(rules.accuracy_and_throughput, 0.3, 1000, 0.0)
    inconclusive(rules.accuracy_and_throughput, 0.3, 0, 900.0)


def test_predicts_uniformly():
    holds(rules.predicts_uniformly, nll(1000.0, 0.05), 1024)
    falsified(rules.predicts_uniformly, nll(1024 * 8, 0.05), 1024)
    falsified(rules.predicts_uniformly, nll(60.0, 0.05), 1024)
    inconclusive(rules.predicts_uniformly, nll(2048.0, 0.3, n=8), 1024)  # CI crosses 2 x vocab
    inconclusive(rules.predicts_uniformly, [*nll(1000.0, n=3), NAN], 1024)


# -- phase 2 ---------------------------------------------------------------------------------------
def pairs(jaccard: float, tensors: int = 50, k: int = 100, noise: int = 0, seed: int = 0) -> list:
    """Three pairs of per-tensor counts with Jaccard about ``jaccard`` (± noise shared entries)."""
    rng = np.random.default_rng(seed)
    inter = round(2 * k * jaccard / (1 + jaccard))
    out = []
    for _ in range(3):
        i = np.clip(inter + rng.integers(-noise, noise + 1, tensors), 0, k)
        out.append(counts(i, np.full(tensors, k), np.full(tensors, k)))
    return out


def test_topk_stable():
    holds(rules.topk_stable, pairs(0.6), 0.3)
    claim = falsified(rules.topk_stable, pairs(0.1), 0.3)
    assert claim.measured["jaccard_range"]["value"][1] < 0.3
    inconclusive(rules.topk_stable, pairs(0.4, tensors=8, noise=60), 0.4)  # CI straddles 0.4
    inconclusive(rules.topk_stable, pairs(1.0), 0.3, data_dependent=False)
    inconclusive(rules.topk_stable, [], 0.3)


@settings(max_examples=20, deadline=None)
@given(hs.floats(0.0, 0.99))
def test_topk_stable_identical_selections_hold_any_threshold(threshold):
    holds(rules.topk_stable, pairs(1.0, tensors=5), threshold)


def test_sets_agree():
    full = np.full(40, 100)
    holds(rules.sets_agree, counts(np.full(40, 80), full, full), ">=", 0.6)
    falsified(rules.sets_agree, counts(np.full(40, 30), full, full), ">=", 0.6)
    mixed = counts(np.r_[np.full(3, 100), np.full(3, 20)], np.full(6, 100), np.full(6, 100))
    inconclusive(rules.sets_agree, mixed, ">", 0.5)


def test_per_layer_vs_global_can_fail():
    """Global top-(k·T) concentrated in one tensor: only k of it lie in the per-tensor top-k."""
    g = torch.zeros(10, 100)
    g[0] = torch.arange(100, 0, -1).float() + 1000  # tensor 0 dominates the global ranking
    scores = {f"t{i}": g[i] + (torch.arange(100).float() / 1e3 if i else 0) for i in range(10)}
    per = select(scores, 10, mode="per_layer")
    glob = select(scores, 100, mode="global")
    falsified(rules.sets_agree, rules.set_counts(glob, per), ">", 0.5)


def test_overlap_in_band():
    full = np.full(40, 100)
    holds(rules.overlap_in_band, counts(np.full(40, 50), full, full), (0.4, 0.6))
    falsified(rules.overlap_in_band, counts(np.full(40, 90), full, full), (0.4, 0.6))
    falsified(rules.overlap_in_band, counts(np.full(40, 10), full, full), (0.4, 0.6))
    crossing = counts(np.r_[np.full(3, 90), np.full(3, 30)], np.full(6, 100), np.full(6, 100))
    inconclusive(rules.overlap_in_band, crossing, (0.4, 0.6))


def gaussian(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_heavy_tail_of_independent_gaussians_is_falsified():
    """|w·g| of independent Gaussians meets the ratio (~12 > 10) but not its permutation null."""
    w, g = {"t": gaussian(100_000, 0)}, gaussian(100_000, 1)
    scores = {"t": (w["t"] * g).abs()}
    observed = score_summary(scores)["concentration"]
    assert observed > 10
    null = rules.null_concentrations(scores, w, "permute", draws=49)
    claim = falsified(rules.heavy_tailed, observed, null, 10.0, 0.05)
    assert claim.measured["p_value"]["value"] > 0.05


def test_heavy_tail_of_aligned_weights_and_gradients_holds():
    """Large gradients where the weights are large (g = w³): concentration beyond the null."""
    w = {"a": gaussian(100_000, 2), "b": 3 * gaussian(50_000, 3)}
    scores = {n: t.pow(4) for n, t in w.items()}
    observed = score_summary(scores)["concentration"]
    null = rules.null_concentrations(scores, w, "permute", draws=49, sample=60_000)
    claim = holds(rules.heavy_tailed, observed, null, 10.0, 0.05)
    assert claim.measured["p_value"]["value"] == pytest.approx(1 / 50)


def test_heavy_tail_rule_cases():
    falsified(rules.heavy_tailed, 5.0, [2.0] * 49, 10.0, 0.05)  # below the ratio
    holds(rules.heavy_tailed, 50.0, [12.0] * 49, 10.0, 0.05)
    inconclusive(rules.heavy_tailed, 50.0, [12.0] * 10, 10.0, 0.05)  # 10 draws: p >= 1/11
    inconclusive(rules.heavy_tailed, NAN, [12.0] * 49, 10.0, 0.05)
    inconclusive(rules.heavy_tailed, 50.0, [12.0] * 48 + [INF], 10.0, 0.05)


@pytest.mark.parametrize("null", ["normal", "chi2"])
def test_gaussian_nulls_of_gaussian_scores_are_not_heavy_tailed(null):
    z = gaussian(100_000, 4)
    scores = {"t": z.abs() if null == "normal" else z.square()}
    observed = score_summary(scores)["concentration"]
    draws = rules.null_concentrations(scores, {}, null, draws=29)
    assert min(draws) < observed < max(draws) or abs(observed - np.median(draws)) < 0.1 * observed
    falsified(rules.heavy_tailed, observed, draws, 1.0, 0.05)


@settings(max_examples=30, deadline=None)
@given(hs.lists(hs.floats(0, 1e3, allow_nan=False, width=32), min_size=1, max_size=500))
def test_concentration_is_score_summarys(values):
    expected = score_summary({"x": torch.tensor(values)})["concentration"]
    got = rules.concentration(np.asarray(values))
    assert got == pytest.approx(expected, rel=1e-5, nan_ok=True) or (math.isinf(got) and math.isinf(expected))


def test_permutation_null_keeps_zero_weights_at_zero():
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    scores = {"t": w * torch.tensor([5.0, 5.0, 1.0, 1.0, 1.0])}
    assert rules.NULLS["grad_x_weight"] == "permute"
    gen = torch.Generator().manual_seed(0)
    out = rules._permuted(w, w, draws=4, m=5, gen=gen)  # factors all 1: a permutation keeps |w|
    assert all(sorted(row) == [0.0, 0.0, 1.0, 2.0, 3.0] for row in out.tolist())
    sampled = rules._permuted(scores["t"], w, draws=2, m=3, gen=gen)  # part of the tensor
    assert sampled.shape == (2, 3) and set(sampled.flatten().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert len(rules.null_concentrations(scores, {"t": w}, "permute", draws=3)) == 3
    sparse = torch.zeros(10_000)
    sparse[[7, 4242]] = 1.0  # rejection fails: the nonzero positions are listed
    j = rules._nonzero_positions(sparse, sparse != 0, (3, 50), gen)
    assert set(j.flatten().tolist()) <= {7, 4242}


def masses(shares_top: float, layers: int = 10) -> dict[int, float]:
    rest = (1 - shares_top) / (layers - 1)
    return {0: shares_top, **{i: rest for i in range(1, layers)}}


def test_top_layers_hold_mass():
    holds(rules.top_layers_hold_mass, [masses(0.8)] * 3, 0.1, 0.5)
    falsified(rules.top_layers_hold_mass, [masses(0.1)] * 3, 0.1, 0.5)
    inconclusive(rules.top_layers_hold_mass, [masses(0.8), masses(0.3)], 0.1, 0.5)
    inconclusive(rules.top_layers_hold_mass, [masses(0.8, layers=4)] * 3, 0.1, 0.5)  # < 10 layers
    inconclusive(rules.top_layers_hold_mass, [{**masses(0.8), 3: NAN}] * 3, 0.1, 0.5)


def test_layer_mass_sums_per_layer():
    scores = {"a": torch.ones(2, 2), "b": torch.full((3,), 2.0), "c": torch.ones(1)}
    assert rules.layer_mass(scores, {"a": 0, "b": 0, "c": None}) == {0: 10.0}


def test_spans_tensors():
    holds(rules.spans_tensors, {"a": 60, "b": 40})
    falsified(rules.spans_tensors, {"a": 100, "b": 0})
    inconclusive(rules.spans_tensors, {})


def test_not_all_embeddings():
    holds(rules.not_all_embeddings, [True, False, True])
    falsified(rules.not_all_embeddings, [True, True])
    inconclusive(rules.not_all_embeddings, [])
