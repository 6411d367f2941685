"""Tests for esa.eligibility and the masked top-k path of esa.select: frozen masks answer as the
masks they froze, and selections among eligible entries follow select's order exactly."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esa.select as select_mod
from esa.eligibility import Eligibility
from esa.perturb import changeable
from esa.select import select
from esa.util.sampling import priority

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def masked(draw, with_nan=True):
    """(scores, masks, k): tied integer scores (NaN among them), masks with k eligible entries
    at least in every tensor."""
    scores, masks = {}, {}
    for t in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 40))
        values = draw(
            st.lists(
                st.sampled_from([-1.0, 0.0, 1.0, 2.0, math.nan] if with_nan else [0.0, 1.0]),
                min_size=n,
                max_size=n,
            )
        )
        bits = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        scores[f"layers.{t}.w"] = torch.tensor(values)
        masks[f"layers.{t}.w"] = torch.tensor(bits, dtype=torch.bool)
    k = draw(st.integers(1, 6))
    for m in masks.values():
        m[: min(k, m.numel())] = True
    return scores, masks, min(k, min(s.numel() for s in scores.values()))


def ordered(score, mask, k, kind, seed, name):
    """The k first eligible entries under select's order: key desc (NaN last), tie priority desc,
    index asc; written out with a sort, independently of esa.select's top-k."""
    key = select_mod._key(score, kind).tolist()
    prio = priority(torch.arange(score.numel()), seed, name).tolist()
    idx = [i for i in range(score.numel()) if mask[i]]
    idx.sort(key=lambda i: (-key[i], -prio[i], i))
    return set(idx[:k])


@SETTINGS
@given(masked(), st.sampled_from(["top", "bottom"]), st.integers(0, 1000), st.sampled_from([2, 8, 1 << 24]))
def test_masked_top_k_follows_the_order(case, kind, seed, chunk):
    scores, masks, k = case
    saved, select_mod._CHUNK = select_mod._CHUNK, chunk
    try:
        sel = select(scores, k, kind, "per_layer", seed=seed, eligible=masks)
    finally:
        select_mod._CHUNK = saved
    for name, s in scores.items():
        assert set(sel.indices[name].tolist()) == ordered(s, masks[name], k, kind, seed, name)


@SETTINGS
@given(
    masked(),
    st.sampled_from(["top", "bottom", "random"]),
    st.sampled_from(["per_layer", "global"]),
    st.integers(0, 99),
)
def test_frozen_masks_select_as_the_masks(case, kind, mode, seed):
    scores, masks, k = case
    frozen = Eligibility.of(masks)
    assert set(frozen) == {n for n, m in masks.items() if not bool(m.all())}
    for name, m in masks.items():
        got = frozen.get(name)  # absent: all eligible
        assert bool(m.all()) if got is None else torch.equal(got, m)
        assert frozen.excluded(name).tolist() == (~m).nonzero().flatten().tolist()
    a = select(scores, k, kind, mode, seed=seed, eligible=masks)
    b = select(scores, k, kind, mode, seed=seed, eligible=frozen)
    assert a.keys() == b.keys() and a.excluded == b.excluded


def test_large_masks_are_kept_as_masks_and_digests_name_the_set():
    most = torch.zeros(64, dtype=torch.bool)
    most[3] = True
    frozen = Eligibility.of({"w": most})
    assert frozen._excluded["w"].dtype == torch.bool  # 63 positions cost more than a 64-byte mask
    assert torch.equal(frozen["w"], most) and frozen.excluded("w").numel() == 63
    few = Eligibility.of({"w": ~torch.nn.functional.one_hot(torch.tensor(5), 64).bool()})
    assert few._excluded["w"].dtype == torch.long
    assert few.digest != frozen.digest
    assert Eligibility.of({"w": torch.ones(64, dtype=torch.bool)}).digest == Eligibility({}, {}).digest


def test_perturbations_that_change_the_same_entries_share_a_digest():
    w = torch.tensor([[0.0, 1.5, -2.0], [0.25, 0.0, 3.0]])
    params = {"w": w}
    digests = {
        p: Eligibility.of(changeable(params, p, scale=s)).digest
        for p, s in [("zero", None), ("sign_flip", None), ("gauss_noise", 0.02), ("gauss_noise", 0.5)]
    }
    assert len(set(digests.values())) == 1
    assert Eligibility.of(changeable(params, "bit_flip")).digest != digests["zero"]
    assert Eligibility.of(changeable(params, "gauss_noise", scale=0.0)).excluded("w").numel() == 6
