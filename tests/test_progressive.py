"""Tests for esa.analyses.progressive: the doubling grid, the growth logic against a model whose
perplexity is a known function of the zeroed weights, the comparison's bounds, and a real pass
on a tiny model (restored bit-exactly)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import esa.analyses.progressive as prog
from esa.analyses.bitflip import random_order
from esa.errors import ConfigError
from esa.models import load_model
from esa.util.bits import bits_view

WINDOWS = torch.zeros(2, 8, dtype=torch.long)


class Planted(torch.nn.Module):
    """4 critical weights and 1000 bulk weights, all 1.0."""

    def __init__(self):
        super().__init__()
        self.crit = torch.nn.Parameter(torch.ones(4))
        self.bulk = torch.nn.Parameter(torch.ones(1000))


def _fake_evaluate(crit_cost: float, bulk_cost: float):
    """PPL = 10 · (1 + crit_cost · zeroed critical + bulk_cost · zeroed bulk)."""

    def evaluate(model, windows, **_):
        z_crit = int((model.crit.detach() == 0).sum())
        z_bulk = int((model.bulk.detach() == 0).sum())
        ppl = 10.0 * (1 + crit_cost * z_crit + bulk_cost * z_bulk)
        return SimpleNamespace(ppl=ppl, nll=math.log(ppl), finite=True)

    return evaluate


def _scores():
    return {
        "crit": torch.full((4,), 5.0),
        "bulk": torch.rand(1000, generator=torch.Generator().manual_seed(0)),
    }


@given(st.integers(1, 5000))
def test_doubling_grid(n):
    counts = prog.doubling(n)
    assert counts[0] == 1 and counts[-1] == n and counts == sorted(set(counts))
    assert all(b == 2 * a for a, b in itertools.pairwise(counts[:-1]))
    assert len(counts) < 2 or counts[-2] < n <= 2 * counts[-2]


def test_doubling_rejects_bad_sizes():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            prog.doubling(bad)


def test_critical_needs_one_weight_random_until_it_hits_one(monkeypatch):
    monkeypatch.setattr(prog, "evaluate", _fake_evaluate(crit_cost=3.0, bulk_cost=0.0))
    model = Planted()
    scores = _scores()
    res = prog.progressive(
        SimpleNamespace(model=model), WINDOWS, scores, "zero", factor=2.0, max_weights=1004, seed=3
    )
    assert res["baseline_ppl"] == 10.0 and res["target_ppl"] == 20.0 and res["counts"][-1] == 1004
    assert res["weights_needed"]["critical"] == 1 and len(res["curves"]["critical"]) == 1
    first_crit = next(i for i, (name, _) in enumerate(random_order(scores, 1004, seed=3)) if name == "crit")
    expected = next(n for n in res["counts"] if n > first_crit)  # the first prefix holding a critical weight
    assert res["weights_needed"]["random"] == expected
    cmp = res["critical_vs_random"]
    assert cmp["bound"] == "exact" and cmp["ratio"] == expected and cmp["critical"] == 1
    assert all(p["reached"] == (p is res["curves"]["random"][-1]) for p in res["curves"]["random"])
    assert bool((model.crit == 1).all()) and bool((model.bulk == 1).all())  # restored


def test_random_that_never_reaches_the_target_gives_a_lower_bound(monkeypatch):
    monkeypatch.setattr(prog, "evaluate", _fake_evaluate(crit_cost=3.0, bulk_cost=0.0))
    model = Planted()
    scores = _scores()
    bulk_only = {"bulk": scores["bulk"]}  # the random population holds no critical weight
    res = prog.progressive(SimpleNamespace(model=model), WINDOWS, bulk_only, "zero", max_weights=64)
    assert res["weights_needed"] == {"critical": None, "random": None}
    assert res["critical_vs_random"]["bound"] == "undefined" and res["critical_vs_random"]["ratio"] is None
    assert [p["n_weights"] for p in res["curves"]["random"]] == [1, 2, 4, 8, 16, 32, 64]
    ranked = {"crit": scores["crit"], "bulk": torch.zeros(1000)}
    monkeypatch.setattr(prog, "evaluate", _fake_evaluate(crit_cost=0.5, bulk_cost=0.0))
    res = prog.progressive(
        SimpleNamespace(model=model), WINDOWS, ranked, "zero", max_weights=8, kinds=("critical",)
    )
    assert res["weights_needed"] == {"critical": 2} and "critical_vs_random" not in res  # 10·(1 + 0.5·2) = 20


def test_lower_bound_when_only_critical_reaches(monkeypatch):
    monkeypatch.setattr(prog, "evaluate", _fake_evaluate(crit_cost=3.0, bulk_cost=0.0))
    model = Planted()
    scores = {
        "crit": torch.full((4,), 5.0),
        "bulk": torch.rand(1000, generator=torch.Generator().manual_seed(1)),
    }
    order = random_order(scores, 16, seed=0)
    assert all(name == "bulk" for name, _ in order)  # this seed's first 16 draws miss the 4 critical
    res = prog.progressive(SimpleNamespace(model=model), WINDOWS, scores, "zero", max_weights=16, seed=0)
    cmp = res["critical_vs_random"]
    assert cmp["bound"] == "lower" and cmp["ratio"] == 16.0 and "weights" in cmp["text"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, "> 1"),
        ({"factor": float("nan")}, "> 1"),
        ({"kinds": ("top",)}, "critical and/or random"),
        ({"method": "melt"}, "unknown perturbation"),
        ({"max_weights": 0}, "positive integer"),
    ],
)
def test_bad_input(kwargs, match, monkeypatch):
    monkeypatch.setattr(prog, "evaluate", _fake_evaluate(1.0, 0.0))
    model = Planted()
    with pytest.raises(ConfigError, match=match):
        prog.progressive(SimpleNamespace(model=model), WINDOWS, _scores(), **{"method": "zero", **kwargs})


def test_real_model_pass_restores_and_plots():
    lm = load_model("tiny-llama", dtype="fp32", device="cpu")
    before = {n: bits_view(p.detach()).clone() for n, p in lm.model.named_parameters()}
    windows = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    scores = {n: p.detach().abs() for n, p in lm.model.named_parameters() if n in lm.param_map.scorable()}
    res = prog.progressive(lm, windows, scores, "sign_flip", factor=1.5, max_weights=8, progress=False)
    for kind in ("critical", "random"):
        points = res["curves"][kind]
        assert [p["n_weights"] for p in points] == res["counts"][: len(points)]
        assert all(p["n_changed"] == p["n_weights"] for p in points)  # |w| > 0: every sign flips
        needed = res["weights_needed"][kind]
        assert needed is None or points[-1]["n_weights"] == needed
    assert math.isfinite(res["baseline_ppl"]) and res["target_ppl"] == pytest.approx(
        1.5 * res["baseline_ppl"]
    )
    for n, p in lm.model.named_parameters():
        assert torch.equal(bits_view(p.detach()), before[n]), n
    fig = prog.plot_progressive(res)
    assert fig.axes[0].get_xlabel() == "perturbed weights"
