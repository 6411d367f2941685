"""Tests for esa.select: brute-force references, random-k, set metrics, frames and CSV."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esa.select as select_mod
from esa.errors import ConfigError
from esa.models.params import ParamInfo, ParamMap
from esa.select import KINDS, Selection, select

SETTINGS = settings(max_examples=25, deadline=None)
EXTREME = st.sampled_from(["top", "bottom"])
MODE = st.sampled_from(["per_layer", "global"])


@st.composite
def score_dicts(draw, distinct=False, min_numel=1):
    n_tensors = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for t in range(n_tensors):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        numel = int(np.prod(shape))
        if numel < min_numel:
            shape = (min_numel,)
        if distinct:
            s = torch.randn(shape, generator=gen)
        else:  # few distinct values -> many ties
            s = torch.randint(-2, 3, shape, generator=gen).float()
        scores[f"layers.{t}.w"] = s
    return scores


def _reference(scores, k, kind, mode):
    """Brute force via concatenation (fine for tiny tensors): list of (name, idx, value)."""
    sign = -1.0 if kind == "top" else 1.0
    entries = []
    groups = [scores] if mode == "global" else [{n: s} for n, s in scores.items()]
    out = []
    for group in groups:
        entries = [(n, i, v) for n, s in group.items() for i, v in enumerate(s.reshape(-1).tolist())]
        entries.sort(key=lambda e: sign * e[2])
        out.extend(entries[:k])
    return out


def _limit(scores, mode):
    numels = [s.numel() for s in scores.values()]
    return min(numels) if mode == "per_layer" else sum(numels)


def _picked(sel):
    return [(n, int(i), float(v)) for n in sel.indices for i, v in zip(sel.indices[n], sel.values[n])]


@SETTINGS
@given(score_dicts(), st.integers(1, 6), EXTREME, MODE)
def test_extreme_values_match_brute_force(scores, k, kind, mode):
    limit = _limit(scores, mode)
    k = min(k, limit)
    sel = select(scores, k, kind=kind, mode=mode)
    ref = _reference(scores, k, kind, mode)
    assert sorted(v for *_, v in _picked(sel)) == sorted(v for *_, v in ref)
    if mode == "per_layer":
        for name in scores:
            assert sel.indices[name].numel() == k
            mine = sorted(v for n, _, v in _picked(sel) if n == name)
            assert mine == sorted(v for n, _, v in ref if n == name)
    # indices are sorted, unique, in range, and values are the scores there
    for name, idx in sel.indices.items():
        assert idx.dtype == torch.long and torch.equal(idx, torch.unique(idx))
        assert torch.equal(sel.values[name], scores[name].reshape(-1)[idx])
    assert sel.size == (k * len(scores) if mode == "per_layer" else k)


@SETTINGS
@given(score_dicts(distinct=True), st.integers(1, 6), EXTREME, MODE)
def test_extreme_index_sets_match_with_distinct_values(scores, k, kind, mode):
    limit = _limit(scores, mode)
    k = min(k, limit)
    sel = select(scores, k, kind=kind, mode=mode)
    assert sel.keys() == {(n, i) for n, i, _ in _reference(scores, k, kind, mode)}


@SETTINGS
@given(EXTREME, MODE, st.integers(0, 2**31 - 1))
def test_ties_are_broken_with_the_seed(kind, mode, seed):
    scores = {"a": torch.ones(10), "b": torch.ones(10)}
    picks = {frozenset(select(scores, 3, kind, mode, seed=seed + s).keys()) for s in range(8)}
    assert len(picks) > 1  # tied scores: different seeds can give different sets
    again = select(scores, 3, kind, mode, seed=seed)
    assert again.keys() == select(scores, 3, kind, mode, seed=seed).keys()  # the same seed, the same set
    assert again.size == (6 if mode == "per_layer" else 3)


@SETTINGS
@given(score_dicts(distinct=True), st.integers(1, 6), EXTREME, MODE, st.integers(0, 1000))
def test_without_ties_the_seed_is_irrelevant(scores, k, kind, mode, seed):
    k = min(k, _limit(scores, mode))
    assert select(scores, k, kind, mode, seed=seed).keys() == select(scores, k, kind, mode, seed=0).keys()


def test_tie_breaks_are_roughly_uniform_over_tensors():
    scores = {"a": torch.ones(6), "b": torch.ones(4)}
    hits = np.zeros(10)
    for seed in range(400):
        for name, i in select(scores, 3, "top", "global", seed=seed).keys():  # noqa: SIM118 (a Selection)
            hits[i + (6 if name == "b" else 0)] += 1
    assert hits.min() > 0.6 * hits.mean() and hits.max() < 1.4 * hits.mean()


@st.composite
def masked_scores(draw, k_max=5):
    """(scores, k, masks) with at least k eligible entries in every tensor."""
    scores = draw(score_dicts())
    k = draw(st.integers(1, min(k_max, min(s.numel() for s in scores.values()))))
    masks = {}
    for name, s in scores.items():
        bits = draw(st.lists(st.booleans(), min_size=s.numel(), max_size=s.numel()))
        masks[name] = torch.tensor(bits, dtype=torch.bool).reshape(s.shape)
        masks[name].view(-1)[:k] = True
    return scores, k, masks


@SETTINGS
@given(masked_scores(), EXTREME, MODE, st.integers(0, 1000))
def test_chunked_selection_equals_one_chunk(case, kind, mode, seed):
    scores, k, masks = case
    whole = select(scores, k, kind, mode, seed=seed, eligible=masks)
    saved, select_mod._CHUNK = select_mod._CHUNK, 2
    try:
        chunked = select(scores, k, kind, mode, seed=seed, eligible=masks)
    finally:
        select_mod._CHUNK = saved
    assert chunked.keys() == whole.keys()


@SETTINGS
@given(masked_scores(), st.sampled_from(KINDS), MODE, st.integers(0, 1000))
def test_ineligible_entries_are_never_selected(case, kind, mode, seed):
    scores, k, masks = case
    sel = select(scores, k, kind, mode, seed=seed, eligible=masks)
    picked = sel.keys()
    assert all(bool(masks[n].reshape(-1)[i]) for n, i in picked)
    assert sel.size == (k * len(scores) if mode == "per_layer" else k)
    assert sel.excluded == sum(int((~m).sum()) for m in masks.values())
    if kind != "random":  # the extreme scores among the eligible ones
        eligible_scores = {n: s.reshape(-1)[masks[n].reshape(-1)] for n, s in scores.items()}
        ref = _reference(eligible_scores, k, kind, mode)
        assert sorted(v for *_, v in _picked(sel)) == sorted(v for *_, v in ref)


@SETTINGS
@given(score_dicts(min_numel=4), st.integers(1, 4), st.sampled_from(KINDS), MODE, st.integers(0, 1000))
def test_all_eligible_is_the_same_as_no_mask(scores, k, kind, mode, seed):
    k = min(k, _limit(scores, mode))
    everything = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    sel = select(scores, k, kind, mode, seed=seed, eligible=everything)
    assert sel.keys() == select(scores, k, kind, mode, seed=seed).keys() and sel.excluded == 0


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_bottom_k_among_nonzero_weights_differs_across_seeds(mode):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, 40, generator=gen)
    w[w.abs() < 0.5] = 0.0  # exact zeros, as in a dequantized 4-bit model
    scores, eligible = {"w": w.abs()}, {"w": w != 0}
    zeros = select(scores, 20, "bottom", mode).keys()
    assert all(float(w.view(-1)[i]) == 0.0 for _, i in zeros)  # without the mask: all zeros
    sel = select(scores, 20, "bottom", mode, eligible=eligible)
    picked = sel.keys()
    assert all(float(w.view(-1)[i]) != 0.0 for _, i in picked)
    assert sel.excluded == int((w == 0).sum())
    random = [select(scores, 20, "random", mode, seed=s, eligible=eligible).keys() for s in range(3)]
    assert random[0] != random[1] and all(float(w.view(-1)[i]) != 0.0 for r in random for _, i in r)


def test_too_few_eligible_entries_raise():
    scores = {"a": torch.randn(6), "b": torch.randn(6)}
    few = {"a": torch.tensor([True, False, False, False, False, True])}
    with pytest.raises(ConfigError, match="only 2 of the 6 entries of 'a'"):
        select(scores, 3, "random", eligible=few)
    assert select(scores, 8, "top", "global", eligible=few).size == 8  # b has no mask: all eligible
    with pytest.raises(ConfigError, match="only 8 scored entries"):
        select(scores, 9, "bottom", "global", eligible=few)
    with pytest.raises(ConfigError, match="bool tensor"):
        select(scores, 1, eligible={"a": torch.ones(5, dtype=torch.bool)})


def test_nan_scores_are_chosen_last():
    s = torch.tensor([float("nan"), 1.0, -1.0, float("nan"), 0.5])
    assert select({"w": s}, 2, kind="top").keys() == {("w", 1), ("w", 4)}
    assert select({"w": s}, 2, kind="bottom").keys() == {("w", 2), ("w", 4)}
    top4 = select({"w": s}, 4, kind="top")
    assert {("w", 1), ("w", 2), ("w", 4)} < top4.keys() < {("w", i) for i in range(5)}  # and one NaN
    assert top4.to_frame()["tensor"].size == 4 and np.isnan(top4.to_frame()["score"].iloc[-1])


@SETTINGS
@given(score_dicts(min_numel=4), st.integers(1, 4), MODE, st.integers(0, 1000))
def test_random_k_unique_valid_reproducible(scores, k, mode, seed):
    limit = _limit(scores, mode)
    k = min(k, limit)
    a = select(scores, k, kind="random", mode=mode, seed=seed)
    b = select(scores, k, kind="random", mode=mode, seed=seed)
    assert a.keys() == b.keys()
    assert a.size == len(a.keys()) == (k * len(scores) if mode == "per_layer" else k)
    for name, idx in a.indices.items():
        assert bool(((idx >= 0) & (idx < scores[name].numel())).all())
        assert torch.equal(a.values[name], scores[name].reshape(-1)[idx])


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_random_k_differs_across_seeds_and_is_large_scale_cheap(mode):
    scores = {"a": torch.zeros(1000, 100), "b": torch.zeros(500)}
    picks = [select(scores, 50, kind="random", mode=mode, seed=s).keys() for s in range(3)]
    assert picks[0] != picks[1] != picks[2]
    if mode == "global":  # both tensors reachable, proportional to size
        counts = [select(scores, 400, kind="random", mode=mode, seed=s).by_tensor_counts() for s in range(5)]
        assert sum(c.get("b", 0) for c in counts) < sum(c["a"] for c in counts)


def test_random_global_is_roughly_uniform():
    scores = {"a": torch.zeros(6), "b": torch.zeros(4)}
    hits = np.zeros(10)
    for seed in range(400):
        for name, i in select(scores, 3, kind="random", mode="global", seed=seed).keys():  # noqa: SIM118 (a Selection, not a dict)
            hits[i + (6 if name == "b" else 0)] += 1
    assert hits.min() > 0.6 * hits.mean() and hits.max() < 1.4 * hits.mean()


def test_global_never_concatenates(monkeypatch):
    scores = {f"w{i}": torch.randn(50) for i in range(4)}
    real_cat = torch.cat

    def guarded(tensors, *args, **kwargs):
        assert sum(t.numel() for t in tensors) <= 2 * 7, "concatenated more than the candidates"
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", guarded)
    sel = select(scores, 7, mode="global")
    monkeypatch.undo()
    ref = _reference(scores, 7, "top", "global")
    assert sel.keys() == {(n, i) for n, i, _ in ref}


@SETTINGS
@given(st.sets(st.integers(0, 20)), st.sets(st.integers(0, 20)))
def test_jaccard_and_overlap_properties(a, b):
    def mk(s):
        idx = torch.tensor(sorted(s), dtype=torch.long)
        k = max(len(s), 1)
        return Selection("top", "global", k, 0, "", {"w": idx}, {"w": idx.float()}, {"w": (21,)})

    sa, sb = mk(a), mk(b)
    j = sa.jaccard(sb)
    assert 0.0 <= j <= 1.0 and j == sb.jaccard(sa)
    assert sa.jaccard(sa) == 1.0 and sa.overlap(sa) == 1.0
    assert 0.0 <= sa.overlap(sb) <= 1.0 and sa.overlap(sb) >= j


def test_counts_and_frame_columns_and_ranks():
    scores = {"m": torch.arange(12.0).reshape(3, 4), "v": torch.tensor([5.0, -1.0, 20.0])}
    sel = select(scores, 2, kind="top", mode="per_layer", metric="abs")
    assert sel.by_tensor_counts() == {"m": 2, "v": 2}
    df = sel.to_frame()
    assert {"tensor", "layer", "component", "expert", "row", "col", "score", "rank"} <= set(df.columns)
    assert list(df["rank"]) == [1, 2, 3, 4]
    assert list(df["score"]) == [20.0, 11.0, 10.0, 5.0]
    m = df[df["tensor"] == "m"].sort_values("col")
    assert list(m["row"]) == [2, 2] and list(m["col"]) == [2, 3]
    assert df["layer"].isna().all()
    bottom = select(scores, 1, kind="bottom").to_frame()
    assert list(bottom["score"]) == [-1.0, 0.0]


def test_frame_uses_param_map():
    info = ParamInfo("model.layers.3.self_attn.q_proj.weight", (3, 4), 3, "attn_q", "matrix")
    pmap = ParamMap({info.name: info})
    sel = select({info.name: torch.arange(12.0).reshape(3, 4)}, 1)
    row = sel.to_frame(pmap).iloc[0]
    assert (row["layer"], row["component"], row["row"], row["col"]) == (3, "attn_q", 2, 3)


@pytest.mark.parametrize("kind", ["top", "bottom", "random"])
def test_csv_round_trip(tmp_path, kind):
    gen = torch.Generator().manual_seed(1)
    scores = {"a.weight": torch.randn(4, 5, generator=gen), "b.bias": torch.randn(7, generator=gen)}
    scores["b.bias"][0] = float("nan")
    sel = select(scores, 3, kind=kind, mode="global", seed=4, metric="wanda")
    path = tmp_path / "sel.csv"
    sel.to_csv(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sel.csv"]  # no temp file left behind
    back = Selection.from_frame(pd.read_csv(path), kind=kind, mode="global", k=3, seed=4, metric="wanda")
    assert back.keys() == sel.keys()
    for name in sel.indices:
        assert torch.equal(back.indices[name], sel.indices[name])
        assert torch.allclose(back.values[name], sel.values[name], equal_nan=True, rtol=0, atol=0)
    again = Selection.from_frame(sel.to_frame())  # attrs carry the metadata
    assert (again.kind, again.mode, again.k, again.seed, again.metric) == (kind, "global", 3, 4, "wanda")
    assert again.shapes == sel.shapes and again.keys() == sel.keys()


def test_from_frame_without_flat_index_uses_shapes():
    sel = select({"m": torch.randn(3, 4)}, 3)
    df = sel.to_frame().drop(columns=["flat_index"])
    assert Selection.from_frame(df, shapes={"m": (3, 4)}).keys() == sel.keys()
    with pytest.raises(ConfigError, match="shapes="):
        Selection.from_frame(df.assign(tensor="x"), shapes={})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k >= 1"),
        (dict(k=-3), "k >= 1"),
        (dict(k=2.5), "integer"),
        (dict(k=7), "lower k or use mode='global'"),
        (dict(k=100, mode="global"), "lower k to at most 12"),
        (dict(k=1, kind="middle"), "top, bottom, random"),
        (dict(k=1, mode="layerwise"), "per_layer, global"),
    ],
)
def test_bad_inputs_raise_config_error(kwargs, match):
    scores = {"a": torch.randn(6), "b": torch.randn(6)}
    with pytest.raises(ConfigError, match=match):
        select(scores, **kwargs)


def test_empty_scores_raise():
    with pytest.raises(ConfigError, match="at least one tensor"):
        select({}, 1)
