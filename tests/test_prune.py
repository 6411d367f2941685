"""Tests for esa.analyses.prune: exact per-group sparsity, tie-breaking, bit-exact restore, the table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.analyses.prune import (
    compare_at,
    mask_indices,
    n_pruned,
    parse_pattern,
    prune_masks,
    pruned,
    pruning_table,
)
from esa.data import prepare_data
from esa.errors import ConfigError, RestoreError
from esa.models import load_model

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t):
    return t.detach().view(INT[t.dtype]).clone()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")


shapes = st.one_of(
    st.tuples(st.integers(1, 9), st.integers(1, 17)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 11)),  # [experts, out, in]
    st.tuples(st.integers(1, 30)),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), ties=st.booleans())
def test_row_masks_have_exact_sparsity_per_row(shape, sparsity, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(shape, generator=gen)
    if ties:  # few distinct values: many ties
        score = (score * 3).floor()
    mask = prune_masks({"w": score}, sparsity, "row")["w"]
    assert mask.shape == score.shape and mask.dtype == torch.bool
    rows_keep = mask.reshape(-1, shape[-1]) if len(shape) >= 2 else mask.reshape(1, -1)
    rows_score = score.reshape(rows_keep.shape)
    k = n_pruned(sparsity, rows_keep.shape[1])
    assert k == math.floor(round(sparsity * rows_keep.shape[1], 6))
    assert ((~rows_keep).sum(dim=1) == k).all()
    # Every pruned entry scores <= every kept entry of its row.
    for keep, s in zip(rows_keep, rows_score):
        if 0 < k < keep.numel():
            assert s[~keep].max() <= s[keep].min()
    # Same as cutting a stable ascending sort at k (ties: lower index pruned first).
    reference = torch.ones_like(rows_keep)
    reference.scatter_(1, torch.argsort(rows_score, dim=1, stable=True)[:, :k], False)
    assert torch.equal(rows_keep, reference)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_layer_masks_have_exact_sparsity_per_tensor(shape, sparsity, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = {"a": torch.randn(shape, generator=gen), "b": torch.randn(7, 3, generator=gen)}
    masks = prune_masks(scores, sparsity, "layer")
    for name, s in scores.items():
        pruned_n = int((~masks[name]).sum())
        assert pruned_n == n_pruned(sparsity, s.numel())
        if 0 < pruned_n < s.numel():
            assert s[~masks[name]].max() <= s[masks[name]].min()


def test_layer_groups_differ_from_row_groups():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    row = prune_masks({"w": score}, 0.5, "row")["w"]
    layer = prune_masks({"w": score}, 0.5, "layer")["w"]
    assert row.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert layer.tolist() == [[False, False, False, False], [True, True, True, True]]


def test_ties_break_by_lower_index_and_nan_is_kept():
    score = torch.tensor([[5.0, 1.0, 1.0, 1.0, float("nan"), 0.5]])
    mask = prune_masks({"w": score}, 0.5, "row")["w"]
    assert mask.tolist() == [[True, False, False, True, True, False]]
    # Deterministic: same input, same mask.
    assert torch.equal(mask, prune_masks({"w": score.clone()}, 0.5, "row")["w"])
    everything = prune_masks({"w": score}, 1.0, "row")["w"]
    assert not everything.any()


def test_n_pruned_survives_float_noise():
    assert n_pruned(0.29, 100) == 29 and n_pruned(0.5, 7) == 3 and n_pruned(1.0, 5) == 5
    assert n_pruned(0.0, 5) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        prune_masks({"w": torch.rand(3, 3)}, bad)


def test_bad_granularity_and_empty_scores():
    with pytest.raises(ConfigError, match="granularity"):
        prune_masks({"w": torch.rand(3, 3)}, 0.5, "column")
    with pytest.raises(ConfigError):
        prune_masks({}, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pruned_zeroes_then_restores_bit_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(12, 6).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(6, 12, generator=gen).to(dtype))
        model.weight[0, 0] = -0.0  # a negative zero must come back as -0.0
    before = {n: _bits(p) for n, p in model.named_parameters()}
    masks = prune_masks({"weight": model.weight.detach().abs().float()}, 0.5, "row")
    with pruned(model, masks) as info:
        w = model.weight.detach()
        assert info.n_selected == 36
        assert (w[~masks["weight"]] == 0).all()
        assert torch.equal(_bits(w)[masks["weight"]], before["weight"][masks["weight"]])
        assert torch.equal(_bits(model.bias), before["bias"])
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), before[n]), n


def test_pruned_restores_on_exception_and_checks_masks():
    model = torch.nn.Linear(8, 4)
    before = _bits(model.weight)
    masks = prune_masks({"weight": torch.rand(4, 8)}, 0.25)
    with pytest.raises(RuntimeError), pruned(model, masks):
        raise RuntimeError("boom")
    assert torch.equal(_bits(model.weight), before)
    with (
        pytest.raises(ConfigError, match="shape"),
        pruned(model, {"weight": torch.ones(8, 4, dtype=torch.bool)}),
    ):
        pass
    with pytest.raises(ConfigError, match="bool"), pruned(model, {"weight": torch.ones(4, 8)}):
        pass
    with (
        pytest.raises(ConfigError, match="not a parameter"),
        pruned(model, {"nope": torch.ones(4, 8, dtype=torch.bool)}),
    ):
        pass
    assert torch.equal(_bits(model.weight), before)


def test_pruned_undoes_stray_writes_to_kept_entries_too():
    model = torch.nn.Linear(8, 4)
    before = _bits(model.weight)
    masks = prune_masks({"weight": torch.rand(4, 8)}, 0.5)
    with pruned(model, masks) as info, torch.no_grad():
        model.weight[masks["weight"]] += 1.0  # a kept entry changed inside the block
    assert info.verified
    assert torch.equal(_bits(model.weight), before)


def test_pruned_raises_restore_error_when_verification_fails(monkeypatch):
    import esa.analyses.prune as prune_mod

    model = torch.nn.Linear(8, 4)
    masks = prune_masks({"weight": torch.rand(4, 8)}, 0.5)
    real = prune_mod.bits_view
    calls = {"n": 0}

    def corrupt(t):  # the verification compare sees a flipped bit
        calls["n"] += 1
        out = real(t)
        return out ^ 1 if calls["n"] == 1 else out

    with pytest.raises(RestoreError, match="bit-exact"), pruned(model, masks):
        monkeypatch.setattr(prune_mod, "bits_view", corrupt)


def test_mask_indices_are_the_pruned_flat_positions():
    mask = torch.tensor([[True, False], [False, True]])
    assert mask_indices({"w": mask})["w"].tolist() == [1, 2]


def test_pruning_table_on_tiny_model_restores_weights(tiny):
    data = prepare_data(tiny.tokenizer, None, max_length=32, max_samples=2)
    before = {n: _bits(p) for n, p in tiny.model.named_parameters()}
    table = pruning_table(
        tiny,
        data,
        methods=[("magnitude", "layer"), ("act_mag", "row"), ("grad_x_weight", "row")],
        sparsities=(0.0, 0.5, "2:4"),
        n_calib=2,
        batch_size=2,
        progress=False,
    )
    for n, p in tiny.model.named_parameters():
        assert torch.equal(_bits(p), before[n]), n
    assert list(table.columns[:5]) == ["metric", "granularity", "sparsity", "pattern", "ppl"]
    assert len(table) == 6 + 3  # 2:4 once per metric
    nm = table[table["pattern"] == "2:4"]
    assert (nm["granularity"] == "row").all() and (nm["achieved_sparsity"] == 0.5).all()
    table = table[table["pattern"] == "unstructured"]
    zero = table[table["sparsity"] == 0.0]
    assert (zero["ppl"] == zero["dense_ppl"]).all() and (zero["n_pruned"] == 0).all()
    half = table[table["sparsity"] == 0.5]
    assert (half["achieved_sparsity"] == 0.5).all()  # tiny-llama's rows and tensors have even sizes
    assert (table["ratio"] == table["ppl"] / table["dense_ppl"]).all()
    assert table.attrs["n_calib"] == 2
    again = pruning_table(
        tiny,
        data,
        methods=[("magnitude", "layer")],
        sparsities=(0.5,),
        n_calib=2,
        dense_ppl=7.0,
        progress=False,
    )
    assert (again["dense_ppl"] == 7.0).all() and again["ppl"].iloc[0] == half["ppl"].iloc[0]


def _table(rows):
    return pd.DataFrame(rows, columns=["metric", "granularity", "sparsity", "ppl", "dense_ppl", "ratio"])


def test_compare_at_picks_best_sensitivity_method():
    table = _table(
        [
            ("magnitude", "layer", 0.5, 40.0, 10.0, 4.0),
            ("magnitude", "row", 0.5, 30.0, 10.0, 3.0),
            ("act_mag", "row", 0.5, 20.0, 10.0, 2.0),
            ("grad_x_weight", "row", 0.5, 16.0, 10.0, 1.6),
            ("grad_x_weight", "layer", 0.5, float("nan"), 10.0, float("nan")),
            ("grad_squared", "row", 0.5, 25.0, 10.0, 2.5),
            ("grad_x_weight", "row", 0.1, 11.0, 10.0, 1.1),
        ]
    )
    out = compare_at(table, 0.5)
    assert out["best"] == {"metric": "grad_x_weight", "granularity": "row", "ppl": 16.0}
    assert out["magnitude"]["granularity"] == "layer"
    assert out["improvement_vs_magnitude"] == pytest.approx((40 - 16) / 40)
    assert out["improvement_vs_wanda"] == pytest.approx((20 - 16) / 20)
    with pytest.raises(ConfigError, match="sparsity"):
        compare_at(table, 0.3)


def test_compare_at_infinite_baseline_and_missing_wanda():
    table = _table(
        [("magnitude", "layer", 0.5, math.inf, 10.0, math.inf), ("grad_squared", "row", 0.5, 50.0, 10.0, 5.0)]
    )
    out = compare_at(table, 0.5)
    assert out["improvement_vs_magnitude"] == 1.0
    assert out["wanda"] is None and out["improvement_vs_wanda"] is None


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (0, 4), (4, 4), (1, 2), (3, 8)]),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_nm_masks_prune_the_n_lowest_of_every_m(rows, blocks, nm, seed, ties):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, blocks * m, generator=g)
    if ties:
        score = score.round()
    keep = prune_masks({"w": score}, f"{n}:{m}", "layer")["w"]  # granularity does not apply
    kb, sb = keep.reshape(-1, m), score.reshape(-1, m)
    assert ((~kb).sum(dim=1) == n).all()
    order = torch.argsort(sb, dim=1, stable=True)
    expected = torch.ones_like(kb)
    expected.scatter_(1, order[:, :n], False)
    assert torch.equal(kb, expected)  # the n lowest; ties by lower index


def test_nm_nan_is_kept_and_shape_errors():
    score = torch.tensor([[float("nan"), 1.0, 2.0, 0.5]])
    assert prune_masks({"w": score}, "2:4")["w"].tolist() == [[True, False, True, False]]
    with pytest.raises(ConfigError, match="multiple of 4"):
        prune_masks({"w": torch.ones(2, 6)}, "2:4")
    for bad in ("2:", "a:4", "5:4", "1:0", "2:4:8"):
        with pytest.raises(ConfigError, match=r"N:M|N <= M"):
            parse_pattern(bad)
    assert parse_pattern(0.5) is None and parse_pattern("2:4") == (2, 4)


def test_compare_at_separates_patterns():
    rows = [
        ("magnitude", "layer", 0.5, "unstructured", 40.0, 10.0, 4.0),
        ("grad_x_weight", "row", 0.5, "unstructured", 20.0, 10.0, 2.0),
        ("magnitude", "row", 0.5, "2:4", 100.0, 10.0, 10.0),
        ("grad_x_weight", "row", 0.5, "2:4", 90.0, 10.0, 9.0),
    ]
    cols = ["metric", "granularity", "sparsity", "pattern", "ppl", "dense_ppl", "ratio"]
    table = pd.DataFrame(rows, columns=cols)
    assert compare_at(table, 0.5)["improvement_vs_magnitude"] == pytest.approx(0.5)
    out = compare_at(table, "2:4")
    assert out["pattern"] == "2:4" and out["magnitude"]["granularity"] == "row"
    assert out["improvement_vs_magnitude"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="sparsity"):
        compare_at(table[table["pattern"] == "unstructured"], "2:4")
