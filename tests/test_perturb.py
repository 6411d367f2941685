"""Tests for esa.perturb: bit-exact restore for every method and dtype, and validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esa.perturb as perturb_mod
from esa.errors import ConfigError, RestoreError
from esa.perturb import (
    PERTURBATIONS,
    POSITIONS,
    bit_position,
    changeable,
    perturbed,
    resolve_prob,
    resolve_scale,
)
from esa.select import select

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}
# every registered perturbation, with a scale where it needs one: a new one is covered when registered
METHOD_ARGS = {
    n: ({"scale": 0.5 if p.positive_scale else 3.0} if p.needs_scale else {})
    for n, p in PERTURBATIONS.items()
}


class Tiny(torch.nn.Module):
    def __init__(self, dtype, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))
        self.b = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(3, 3, generator=gen).to(dtype))


def _bits(t):
    return t.detach().view(INT[t.dtype]).clone()


def _snapshot(model):
    return {n: _bits(p) for n, p in model.named_parameters()}


def _assert_same(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), snap[n]), n


def _selection(model, k=4, seed=0, names=("a", "b")):
    scores = {n: p.detach().float().abs() for n, p in model.named_parameters() if n in names}
    return select(scores, k, kind="random", seed=seed)


def test_builtin_methods_registered():
    assert set(PERTURBATIONS) >= {"zero", "sign_flip", "gauss_noise", "scale", "bit_flip"}


def test_default_scales_come_from_the_registry():
    assert {n: p.default_scale for n, p in PERTURBATIONS.items()} == {
        "zero": None,
        "sign_flip": None,
        "gauss_noise": 0.02,
        "scale": 0.0,
        "bit_flip": None,
        "adaptive_noise": 0.02,
        "magnitude_scaling": 2.0,
        "quantization": 4.0,
        "quantization_per_row": 4.0,
    }
    assert resolve_scale("gauss_noise") == 0.02 and resolve_scale("gauss_noise", 0.05) == 0.05
    assert resolve_scale("zero") is None and resolve_scale("scale", 2.0) == 2.0
    with pytest.raises(ConfigError, match="unknown perturbation 'nope'"):
        resolve_scale("nope")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_restore_is_bit_exact(dtype, method):
    model = Tiny(dtype)
    snap = _snapshot(model)
    sel = _selection(model)
    with perturbed(model, sel, method, **METHOD_ARGS[method]) as info:
        assert info.method == method and info.n_selected == 8
        assert set(info.params) == {"a", "b"}
        assert 0 <= info.n_changed <= 8
        assert torch.equal(_bits(model.c), snap["c"])  # unselected tensor untouched
        if method != "zero":
            assert info.n_changed > 0
    _assert_same(model, snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_restore_when_body_raises(dtype, method):
    model = Tiny(dtype, seed=3)
    snap = _snapshot(model)
    with (
        pytest.raises(KeyError, match="boom"),
        perturbed(model, _selection(model), method, **METHOD_ARGS[method]),
    ):
        raise KeyError("boom")
    _assert_same(model, snap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_flip_changes_exactly_that_bit_in_selected_entries(dtype):
    model = Tiny(dtype)
    snap = _snapshot(model)
    sel = _selection(model, k=5)
    nbits = torch.finfo(dtype).bits
    for bit in (0, nbits - 2, nbits - 1, None):
        expected = 1 << (nbits - 2 if bit is None else bit)
        with perturbed(model, sel, "bit_flip", bit=bit) as info:
            for name in ("a", "b", "c"):
                diff = (_bits(getattr(model, name)) ^ snap[name]).view(-1).tolist()
                idx = set(sel.indices.get(name, torch.empty(0, dtype=torch.long)).tolist())
                for i, d in enumerate(diff):
                    assert d % (1 << nbits) == (expected if i in idx else 0), (name, i)
            assert info.n_changed == 10
        _assert_same(model, snap)


def test_default_bit_values():
    assert [perturb_mod.default_bit(d) for d in DTYPES] == [30, 14, 14, 62]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_flips_producing_inf_and_nan_restore_exactly(dtype):
    model = Tiny(dtype)
    with torch.no_grad():
        model.a.view(-1)[:4] = torch.tensor([1.5, -2.0, 0.75, 3.0], dtype=dtype)
    snap = _snapshot(model)
    sel = {"a": torch.arange(4)}
    with perturbed(model, sel, "bit_flip"):  # exponent MSB on these values -> inf/nan/huge
        assert not bool(torch.isfinite(model.a.view(-1)[:4].float()).all()) or dtype == torch.float64
    _assert_same(model, snap)
    nan_model = Tiny(dtype)
    with torch.no_grad():
        nan_model.b.view(-1)[:2] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
    snap = _snapshot(nan_model)
    for method in METHOD_ARGS:
        with perturbed(nan_model, {"b": torch.arange(3)}, method, **METHOD_ARGS[method]):
            pass
        _assert_same(nan_model, snap)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.sampled_from(sorted(METHOD_ARGS)),
    st.integers(0, 10_000),
    st.floats(0.0, 1.0),
    st.integers(1, 9),
)
def test_restore_property(dtype, method, seed, prob, k):
    model = Tiny(dtype, seed=seed)
    snap = _snapshot(model)
    sel = _selection(model, k=min(k, 7), seed=seed, names=("a", "b", "c"))
    with perturbed(model, sel, method, prob=prob, seed=seed, **METHOD_ARGS[method]) as info:
        assert info.n_changed <= info.n_selected
    _assert_same(model, snap)


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_prob_zero_changes_nothing(method):
    model = Tiny(torch.float32)
    snap = _snapshot(model)
    with perturbed(model, _selection(model), method, prob=0.0, **METHOD_ARGS[method]) as info:
        assert info.n_changed == 0
        _assert_same(model, snap)


def test_gauss_noise_touches_only_selected_and_is_seeded():
    model = Tiny(torch.float32)
    snap = _snapshot(model)
    sel = _selection(model, k=3)
    seen = []
    for _ in range(2):
        with perturbed(model, sel, "gauss_noise", scale=0.1, seed=7):
            for name in ("a", "b", "c"):
                changed = (_bits(getattr(model, name)) != snap[name]).view(-1).nonzero().flatten()
                assert set(changed.tolist()) <= set(sel.indices.get(name, torch.empty(0)).tolist())
            seen.append(model.a.detach().clone())
    assert torch.equal(seen[0], seen[1])
    with perturbed(model, sel, "gauss_noise", scale=0.1, seed=8):
        assert not torch.equal(model.a.detach(), seen[0])


def test_zero_scale_sign_values():
    model = Tiny(torch.float32)
    idx = torch.tensor([0, 3])
    orig = model.b.detach()[idx].clone()
    with perturbed(model, {"b": idx}, "zero"):
        assert torch.equal(model.b.detach()[idx], torch.zeros(2))
    with perturbed(model, {"b": idx}, "sign_flip"):
        assert torch.equal(model.b.detach()[idx], -orig)
    with perturbed(model, {"b": idx}, "scale", scale=2.0):
        assert torch.equal(model.b.detach()[idx], 2 * orig)


def test_params_dict_with_tied_weights():
    shared = torch.nn.Parameter(torch.randn(4, 3))
    params = {"embed.weight": shared, "lm_head.weight": shared}
    snap = _bits(shared)
    sel = {"embed.weight": torch.tensor([0, 1]), "lm_head.weight": torch.tensor([1, 5])}
    with perturbed(params, sel, "sign_flip") as info:
        assert info.n_selected == 3  # merged, each entry flipped once
        flipped = (_bits(shared) != snap).view(-1).nonzero().flatten().tolist()
        assert flipped == [0, 1, 5]
    assert torch.equal(_bits(shared), snap)


def test_non_contiguous_parameter():
    base = torch.randn(4, 5)
    p = torch.nn.Parameter(base.t())  # non-contiguous view
    assert not p.is_contiguous()
    snap = _bits(p)
    with perturbed({"p": p}, {"p": torch.tensor([0, 7])}, "zero"):
        assert float(p.detach().reshape(-1)[7]) == 0.0
    assert torch.equal(_bits(p), snap)


def test_sabotaged_restore_raises(monkeypatch):
    model = Tiny(torch.float32)
    monkeypatch.setattr(perturb_mod, "_restore", lambda saved: None)
    with pytest.raises(RestoreError, match="bit-exact"), perturbed(model, _selection(model), "sign_flip"):
        pass


def test_checksum_catches_changes_outside_selection():
    model = Tiny(torch.float32)
    with pytest.raises(RestoreError), perturbed(model, {"a": torch.tensor([0])}, "zero"), torch.no_grad():
        model.a.view(-1)[5] += 1.0


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("melt", {}, "unknown perturbation"),
        ("gauss_noise", {}, "needs scale="),
        ("gauss_noise", {"scale": -0.1}, "must be > 0"),
        ("gauss_noise", {"scale": 0.0}, "must be > 0"),
        ("scale", {"scale": float("nan")}, "finite"),
        ("bit_flip", {"prob": 1.5}, r"\[0, 1\]"),
        ("zero", {"prob": -0.1}, r"\[0, 1\]"),
        ("bit_flip", {"bit": 32}, "0..31"),
        ("bit_flip", {"bit": -1}, "0..31"),
        ("bit_flip", {"bit": 1.5}, "integer"),
        ("bit_flip", {"bit": "exponent"}, "exponent_lsb"),
    ],
)
def test_bad_inputs_raise_config_error(method, kwargs, match):
    model = Tiny(torch.float32)
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=match), perturbed(model, _selection(model), method, **kwargs):
        pass
    _assert_same(model, snap)


def test_bit_range_depends_on_dtype():
    with (
        pytest.raises(ConfigError, match=r"0\.\.15"),
        perturbed(Tiny(torch.bfloat16), {"a": torch.tensor([0])}, "bit_flip", bit=20),
    ):
        pass


def test_unknown_tensor_and_bad_index():
    model = Tiny(torch.float32)
    with (
        pytest.raises(ConfigError, match="not a parameter"),
        perturbed(model, {"zz": torch.tensor([0])}, "zero"),
    ):
        pass
    with pytest.raises(ConfigError, match="out of range"), perturbed(model, {"b": torch.tensor([7])}, "zero"):
        pass


def test_default_probs_come_from_the_registry():
    assert {n: p.default_prob for n, p in PERTURBATIONS.items()} == {
        "zero": 1.0,
        "sign_flip": 1.0,
        "gauss_noise": 1.0,
        "scale": 1.0,
        "bit_flip": 0.05,
        "adaptive_noise": 1.0,
        "magnitude_scaling": 1.0,
        "quantization": 1.0,
        "quantization_per_row": 1.0,
    }
    assert resolve_prob("bit_flip") == 0.05 and resolve_prob("bit_flip", 1.0) == 1.0
    assert resolve_prob("zero") == 1.0
    with pytest.raises(ConfigError, match="unknown perturbation"):
        resolve_prob("nope")


BITS = {  # position -> bit index per dtype
    "sign": [31, 15, 15, 63],
    "exponent_msb": [30, 14, 14, 62],
    "exponent_lsb": [23, 10, 7, 52],
    "mantissa_msb": [22, 9, 6, 51],
    "mantissa": [22, 9, 6, 51],
    "mantissa_lsb": [0, 0, 0, 0],
}


@pytest.mark.parametrize("position", POSITIONS)
def test_named_bit_positions(position):
    assert [bit_position(position, d) for d in DTYPES] == BITS[position]


def test_named_bit_semantics():
    x = torch.tensor([0.75, -1.5, 3.0])
    for position, expected in {
        "sign": [-0.75, 1.5, -3.0],
        "exponent_lsb": [1.5, -0.75, 6.0],  # the lowest exponent bit doubles or halves |w|
        "mantissa_msb": [0.5, -1.0, 2.0],
    }.items():
        params = {"w": torch.nn.Parameter(x.clone())}
        with perturbed(params, {"w": torch.arange(3)}, "bit_flip", bit=position):
            assert params["w"].detach().tolist() == expected, position
        assert torch.equal(params["w"].detach(), x)


def test_named_bit_is_resolved_per_dtype():
    model = Tiny(torch.bfloat16)
    snap = _snapshot(model)
    with perturbed(model, {"a": torch.tensor([0])}, "bit_flip", bit="exponent_lsb"):
        assert int((_bits(model.a) ^ snap["a"]).view(-1)[0]) == 1 << 7
    _assert_same(model, snap)


def test_changeable_masks():
    w = torch.tensor([[0.0, 1.5], [-2.0, 0.0]])
    params = {"w": torch.nn.Parameter(w.clone()), "v": torch.nn.Parameter(torch.zeros(3))}
    nonzero = w != 0
    for method in ("zero", "sign_flip", "gauss_noise", "scale"):
        masks = changeable(params, method)
        assert set(masks) == {"w", "v"} and len(masks) == 2
        assert torch.equal(masks["w"], nonzero) and not masks["v"].any()
    assert changeable(params, "bit_flip")["w"].all() and changeable(params, "bit_flip")["v"].all()
    assert not changeable(params, "scale", scale=1.0)["w"].any()
    assert torch.equal(changeable(params, "scale", scale=2.0)["w"], nonzero)
    assert list(changeable(params, "zero", names=["v"])) == ["v"]
    with pytest.raises(ConfigError, match="unknown parameter"):
        changeable(params, "zero", names=["nope"])
    with pytest.raises(ConfigError, match="unknown perturbation"):
        changeable(params, "melt")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from(sorted(METHOD_ARGS)), st.integers(0, 10_000))
def test_changeable_entries_are_exactly_the_changed_ones(dtype, method, seed):
    model = Tiny(dtype, seed=seed)
    with torch.no_grad():
        model.a.view(-1)[::3] = 0.0  # exact zeros
    snap = _snapshot(model)
    masks = dict(changeable(model, method, scale=METHOD_ARGS[method].get("scale")))  # before: lazy
    everything = {n: torch.arange(p.numel()) for n, p in model.named_parameters()}
    with perturbed(model, everything, method, seed=seed, **METHOD_ARGS[method]):
        for name, p in model.named_parameters():
            changed = p.detach() != snap[name].view(dtype)  # a changed value (-0.0 == 0.0)
            assert not (changed & ~masks[name]).any(), (method, name)  # never outside the mask
            if method != "gauss_noise":  # noise can round to the same value
                assert torch.equal(changed, masks[name]), (method, name)
    _assert_same(model, snap)
