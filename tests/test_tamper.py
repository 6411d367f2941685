"""Tests for esa.analyses.tamper: exceedances, ranks and detections match a brute-force computation
over concatenated maps; a zero noise floor; bad input; the planted change (value, restore, seeding);
an end-to-end scan of a tiny model that locates a planted weight and passes an unchanged copy."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from esa.analyses.tamper import compare_scores, noise_floor, plant_site, planted, plot_tamper
from esa.data import prepare_data
from esa.errors import ConfigError
from esa.metrics.registry import compute_scores
from esa.models import load_model, weights_sha256


def maps(seed: int, shapes=((5, 7), (3, 11), (13,))):
    gen = torch.Generator().manual_seed(seed)
    ref = {f"t{i}": torch.rand(s, generator=gen) for i, s in enumerate(shapes)}
    noise = {n: s + 0.1 * torch.rand(s.shape, generator=gen) for n, s in ref.items()}
    suspect = {n: s + 0.2 * torch.rand(s.shape, generator=gen) ** 4 for n, s in ref.items()}
    return ref, suspect, noise


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), margin=st.floats(0.1, 3.0), pick=st.integers(0, 10_000))
def test_matches_brute_force(seed, margin, pick):
    ref, suspect, noise = maps(seed)
    names = list(ref)
    name = names[pick % len(names)]
    flat = pick % ref[name].numel()
    report = compare_scores(ref, suspect, noise, margin=margin, top=5, watch=[(name, flat)])
    floors = noise_floor(ref, noise)
    e = {n: ((suspect[n] - ref[n]).abs() / floors[n]).reshape(-1) for n in names}
    every = torch.cat(list(e.values()))
    assert report.n_entries == every.numel()
    assert report.n_detected == int((every > margin).sum())
    assert report.max_exceedance == pytest.approx(float(every.max()))
    w = report.watched[f"{name}[{flat}]"]
    assert w["exceedance"] == pytest.approx(float(e[name][flat]))
    assert w["rank"] == 1 + int((every > e[name][flat]).sum())
    by_tensor = sorted(names, key=lambda n: -float(e[n].max()))
    assert [r["tensor"] for r in report.tensors] == by_tensor
    assert w["tensor_rank"] == by_tensor.index(name) + 1
    assert [t["exceedance"] for t in report.top] == pytest.approx(torch.topk(every, 5).values.tolist())
    assert [t["rank"] for t in report.top] == [1, 2, 3, 4, 5]


def test_zero_noise_floor_gives_infinite_exceedance_where_moved():
    ref = {"a": torch.ones(4)}
    suspect = {"a": torch.tensor([1.0, 1.0, 3.0, 1.0])}
    report = compare_scores(ref, suspect, ref, watch=[("a", 2), ("a", 0)])
    assert report.watched["a[2]"]["exceedance"] == math.inf and report.watched["a[2]"]["rank"] == 1
    assert report.watched["a[0]"]["exceedance"] == 0.0 and report.watched["a[0]"]["rank"] == 2
    assert report.n_detected == 1 and report.detected
    assert not compare_scores(ref, ref, ref).detected


@pytest.mark.parametrize(
    ("suspect", "kwargs", "needle"),
    [
        ({"b": torch.ones(4)}, {}, "other tensors"),
        ({"a": torch.ones(5)}, {}, "shape"),
        ({"a": torch.tensor([1.0, math.nan, 1.0, 1.0])}, {}, "NaN/inf"),
        ({"a": torch.ones(4)}, {"margin": 0.0}, "margin"),
        ({"a": torch.ones(4)}, {"watch": [("a", 4)]}, "not a scored entry"),
    ],
)
def test_bad_input_is_one_line(suspect, kwargs, needle):
    ref = {"a": torch.ones(4)}
    with pytest.raises(ConfigError, match=needle):
        compare_scores(ref, suspect, {"a": torch.full((4,), 2.0)}, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-llama", device="cpu")
    data = prepare_data(lm.tokenizer, "builtin", None, max_length=32, max_samples=4)
    return lm, data


def test_planted_sets_the_value_and_restores(tiny):
    lm, _ = tiny
    site = plant_site(lm, 3)
    assert site == plant_site(lm, 3) and site[0] in lm.param_map.scorable()
    param = dict(lm.model.named_parameters())[site[0]]
    before, old = weights_sha256(lm.model), float(param.detach().reshape(-1)[site[1]])
    rms = float(param.detach().pow(2).mean().sqrt())
    with planted(lm, site, 20.0) as info:
        assert float(param.detach().reshape(-1)[site[1]]) == pytest.approx(math.copysign(20.0 * rms, old))
        assert info["old"] == old
    assert weights_sha256(lm.model) == before
    with pytest.raises(ConfigError, match="size > 0"), planted(lm, site, 0.0):
        pass


def test_scan_locates_a_planted_weight_and_passes_a_copy(tiny):
    lm, data = tiny

    def score(model, seed):
        return compute_scores(model, "act_mag", data.calibration(1, seed), seed=seed, progress=False)

    ref, noise = score(lm, 0), score(lm, 1)
    site = plant_site(lm, 0)
    with planted(lm, site, 20.0):
        suspect = score(lm, 0)
    report = compare_scores(ref, suspect, noise, watch=[site])
    w = report.watched[f"{site[0]}[{site[1]}]"]
    assert w["rank"] == 1 and w["tensor_rank"] == 1 and w["exceedance"] > 1.0
    twin = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    clean = compare_scores(ref, score(twin, 0), noise)
    assert not clean.detected and clean.max_exceedance < 1e-3
    assert isinstance(plot_tamper(report, highlight=site[0]), Figure)
