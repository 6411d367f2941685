"""Tests for esa.analyses.bitflip: bit positions, single-bit changes, curves, failure logic, plots."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from esa.analyses.bitflip import (
    bit_position,
    critical_vs_random,
    failure_threshold,
    flip_comparison,
    flip_curve,
    flips_to_failure,
    is_failure,
    plot_flip_curves,
    random_order,
    ranked_order,
)
from esa.analyses.bitsearch import (
    _gradients,
    bits_except,
    flipped_values,
    guided_search,
    plot_positions,
    position_vulnerability,
    random_search,
)
from esa.data import prepare_data
from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.models import load_model
from esa.perturb import default_bit, perturbed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
EXPECTED = {  # position -> bit per dtype
    "sign": {torch.float32: 31, torch.bfloat16: 15, torch.float16: 15},
    "exponent_msb": {torch.float32: 30, torch.bfloat16: 14, torch.float16: 14},
    "mantissa": {torch.float32: 22, torch.bfloat16: 6, torch.float16: 9},
    "mantissa_lsb": {torch.float32: 0, torch.bfloat16: 0, torch.float16: 0},
}


def _bits(t):
    return t.detach().view(INT[t.dtype]).clone()


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-llama", device="cpu")
    data = prepare_data(lm.tokenizer, None, max_length=32, max_samples=2)
    return lm, data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", sorted(EXPECTED))
def test_bit_positions(dtype, position):
    assert bit_position(position, dtype) == EXPECTED[position][dtype]
    assert bit_position(None, dtype) == default_bit(dtype)
    assert bit_position(3, dtype) == 3


def test_bit_position_semantics():
    x = torch.tensor([0.75, -1.5, 3.0])
    ints = x.view(torch.int32)
    sign = (ints ^ torch.tensor(-(2**31), dtype=torch.int32)).view(torch.float32)
    assert sign.tolist() == [-0.75, 1.5, -3.0]
    mant = (ints ^ (1 << bit_position("mantissa", torch.float32))).view(torch.float32)
    assert mant.tolist() == [0.5, -1.0, 2.0]  # top mantissa bit: 1.5 x 2^e <-> 1.0 x 2^e
    exp = (torch.tensor([0.5, 1.0, 2.0]).view(torch.int32) ^ (1 << 30)).view(torch.float32)
    assert (
        exp[0].item() == 2.0**127 and math.isinf(exp[1].item()) and exp[2].item() == 0.0
    )  # 2.0 -> exponent 0: zero


@pytest.mark.parametrize("bad", [32, -1, "exponent", True])
def test_bad_bit_positions(bad):
    with pytest.raises(ConfigError):
        bit_position(bad, torch.float32)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    position=st.sampled_from([*sorted(EXPECTED), None]),
    seed=st.integers(0, 2**16),
    n=st.integers(1, 20),
)
def test_flip_changes_exactly_the_requested_bit(dtype, position, seed, n):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.nn.Parameter(torch.randn(5, 6, generator=gen).to(dtype))}
    before = _bits(params["w"])
    idx = torch.randperm(30, generator=gen)[:n]
    bit = bit_position(position, dtype)
    with perturbed(params, {"w": idx}, "bit_flip", bit=bit) as info:
        diff = (_bits(params["w"]) ^ before).reshape(-1)
        nbits = 8 * params["w"].element_size()
        mask = 1 << bit
        if mask >= 1 << (nbits - 1):
            mask -= 1 << nbits
        assert (diff[idx] == mask).all()  # exactly that bit, in every selected entry
        others = torch.ones(30, dtype=torch.bool)
        others[idx] = False
        assert (diff[others] == 0).all()  # nothing else
        assert info.n_changed == n
    assert torch.equal(_bits(params["w"]), before)


def _curve(pairs):
    return [{"n_flips": n, "ppl": p} for n, p in pairs]


def test_flips_to_failure_on_synthetic_curves():
    curve = _curve([(1, 10.0), (2, 12.0), (4, 150.0), (8, 90.0), (16, math.inf)])
    assert flips_to_failure(curve, 100.0) == 4
    assert flips_to_failure(curve, 200.0) == 16  # inf fails
    assert flips_to_failure(_curve([(1, 10.0), (2, math.nan)]), 100.0) == 2  # NaN fails
    assert flips_to_failure(_curve([(1, 10.0), (2, 11.0)]), 100.0) is None
    assert flips_to_failure(_curve([(4, 100.0)]), 100.0) == 4  # threshold is inclusive
    assert flips_to_failure([], 100.0) is None
    unsorted = _curve([(8, 500.0), (2, 500.0), (1, 1.0)])
    assert flips_to_failure(unsorted, 100.0) == 2
    assert is_failure(math.nan, 1.0) and is_failure(math.inf, 1.0) and not is_failure(0.5, 1.0)
    assert failure_threshold(12.5) == 125.0
    with pytest.raises(ConfigError):
        failure_threshold(math.inf)


def test_critical_vs_random_bounds():
    top = _curve([(1, 5.0), (2, 500.0)])
    rnd = _curve([(1, 5.0), (2, 5.0), (4, 5.0), (8, 5.0), (16, 1e4)])
    out = critical_vs_random(top, rnd, 100.0)
    assert (out["top"], out["random"], out["ratio"], out["bound"]) == (2, 16, 8.0, "exact")
    never = _curve([(n, 5.0) for n in (1, 2, 4, 8)])
    out = critical_vs_random(top, never, 100.0)
    assert out["random"] is None and out["bound"] == "lower" and out["ratio"] == 4.0
    assert out["text"].startswith("> 4")
    out = critical_vs_random(never, rnd, 100.0)
    assert out["ratio"] is None and out["bound"] == "undefined"


def test_orders(tiny):
    scores = {"a": torch.tensor([[3.0, 1.0], [2.0, 9.0]]), "b": torch.tensor([5.0, 0.0, 4.0])}
    assert ranked_order(scores, 3, "top") == [("a", 3), ("b", 0), ("b", 2)]
    assert ranked_order(scores, 2, "bottom") == [("b", 1), ("a", 1)]
    order = random_order(scores, 7, seed=1)
    assert sorted(order) == sorted([("a", i) for i in range(4)] + [("b", i) for i in range(3)])
    assert order == random_order(scores, 7, seed=1)
    with pytest.raises(ConfigError):
        ranked_order(scores, 2, "random")


def test_flip_curve_on_tiny_model_restores_and_stops(tiny):
    lm, data = tiny
    before = {n: _bits(p) for n, p in lm.model.named_parameters()}
    name = "model.layers.0.mlp.down_proj.weight"
    order = [(name, i) for i in range(8)] + [(name, 0)]  # duplicate dropped
    curve = flip_curve(lm, data, order, counts=(1, 2, 8), bit="sign", progress=False, label="t")
    assert [p["n_flips"] for p in curve] == [1, 2, 8]
    assert [p["n_changed"] for p in curve] == [1, 2, 8]
    assert all(p["bit"] == 31 and p["dtype"] == "float32" and p["failed"] is None for p in curve)
    for n, p in lm.model.named_parameters():
        assert torch.equal(_bits(p), before[n]), n
    stopped = flip_curve(lm, data, order, counts=(1, 2, 8), failure_ppl=0.0, progress=False)
    assert len(stopped) == 1 and stopped[0]["failed"] is True
    with pytest.raises(ConfigError, match="load_model"):
        flip_curve(lm, data, order, counts=(1,), dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="exceeds"):
        flip_curve(lm, data, order, counts=(16,))


def test_flip_curve_nonfinite_ppl_reported(tiny):
    lm, data = tiny
    name = "model.norm.weight"  # initialised to 1.0; exponent MSB flip of 1.0 (fp32) gives inf
    assert dict(lm.model.named_parameters())[name][0].item() == 1.0
    curve = flip_curve(lm, data, [(name, 0)], counts=(1,), progress=False)
    assert not curve[0]["finite"] and not math.isfinite(curve[0]["ppl"])
    assert flips_to_failure(curve, 1e30) == 1


def test_flip_comparison_and_plot(tiny):
    lm, data = tiny
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    scores = {n: dict(lm.model.named_parameters())[n].detach().abs() for n in names}
    out = flip_comparison(lm, data, scores, counts=(1, 4), progress=False)
    assert set(out["curves"]) == {"top", "random", "bottom"}
    assert out["failure_ppl"] == pytest.approx(10 * out["baseline_ppl"])
    assert out["critical_vs_random"]["bound"] in ("exact", "lower", "undefined")
    curves = dict(out["curves"])
    curves["broken"] = _curve([(1, 3.0), (2, math.inf), (4, math.nan)])
    fig = plot_flip_curves(curves, baseline_ppl=out["baseline_ppl"], failure_ppl=out["failure_ppl"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


# --- esa.analyses.bitsearch: bit positions, the guided search, random flips --------------------


@pytest.fixture(scope="module")
def tiny_bf16():
    lm = load_model("tiny-llama", dtype="bf16", device="cpu")
    data = prepare_data(lm.tokenizer, "builtin", None, max_length=32, max_samples=2)
    base = evaluate(lm.model, data.eval_ids, 2, progress=False).ppl
    return lm, data, base


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bit=st.integers(0, 15),
    seed=st.integers(0, 1000),
)
def test_flipped_values_match_the_bit_flip_perturbation(dtype, bit, seed):
    w = torch.randn(17, generator=torch.Generator().manual_seed(seed)).to(dtype)
    expected = w.clone()
    with perturbed({"w": expected}, {"w": torch.arange(17)}, "bit_flip", bit=bit):
        flipped = expected.clone()
    assert torch.equal(_bits(flipped_values(w, bit)), _bits(flipped))


def test_bits_except():
    assert bits_except(torch.bfloat16, ["exponent_msb"]) == [b for b in range(16) if b != 14]
    assert bits_except(torch.float32) == list(range(32))


def test_guided_search_takes_the_best_first_order_flip(tiny_bf16):
    lm, data, base = tiny_bf16
    before = {n: _bits(p) for n, p in lm.model.named_parameters()}
    bits = bits_except(torch.bfloat16, ["exponent_msb"])
    calib = data.calibration(1, 0)
    out = guided_search(
        lm, data, calib, bits=bits, max_flips=2, failure_ppl=math.inf, batch_size=2, per_tensor=10**9
    )
    assert [p["n_flips"] for p in out["curve"]] == [1, 2] and out["flips_to_failure"] is None
    assert all(_bits(p).equal(before[n]) for n, p in lm.model.named_parameters())  # restored
    params = dict(lm.model.named_parameters())
    grads = _gradients(lm, calib, params, lm.param_map.scorable(), 2)
    best = max(
        (
            float(
                g.reshape(-1)[i]
                * (
                    flipped_values(params[n].detach().reshape(-1)[i : i + 1], b).float()
                    - params[n].detach().reshape(-1)[i].float()
                )
            ),
            n,
            i,
            b,
        )
        for n, g in grads.items()
        for b in bits
        for i in [
            int(
                torch.nan_to_num(
                    g.reshape(-1)
                    * (
                        flipped_values(params[n].detach().reshape(-1), b).float()
                        - params[n].detach().reshape(-1).float()
                    ),
                    nan=-math.inf,
                    posinf=-math.inf,
                ).argmax()
            )
        ]
    )
    name, flat, bit, gain = out["flips"][0]
    assert (name, flat, bit) == best[1:] and gain == pytest.approx(best[0], rel=1e-4)
    stop = guided_search(lm, data, calib, bits=bits, max_flips=3, failure_ppl=base * (1 - 1e-9), batch_size=2)
    assert stop["flips_to_failure"] == 1 and len(stop["curve"]) == 1  # any PPL >= failure: stops at once


def test_random_search_grid_restores_and_is_seeded(tiny_bf16):
    lm, data, _ = tiny_bf16
    before = {n: _bits(p) for n, p in lm.model.named_parameters()}
    bits = bits_except(torch.bfloat16, ["exponent_msb"])
    out = random_search(lm, data, bits=bits, max_flips=5, failure_ppl=math.inf, seed=3, batch_size=2)
    assert [p["n_flips"] for p in out["curve"]] == [1, 2, 4, 5] and out["flips_to_failure"] is None
    assert out == random_search(lm, data, bits=bits, max_flips=5, failure_ppl=math.inf, seed=3, batch_size=2)
    assert all(_bits(p).equal(before[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(ConfigError):
        random_search(lm, data, bits=[], max_flips=5, failure_ppl=math.inf)


def test_position_vulnerability_rows(tiny_bf16):
    lm, data, base = tiny_bf16
    scores = {
        n: p.detach().abs().float() for n, p in lm.model.named_parameters() if n in lm.param_map.scorable()
    }
    before = {n: _bits(p) for n, p in lm.model.named_parameters()}
    rows = position_vulnerability(lm, data, 4, scores=scores, failure_ppl=10 * base, batch_size=2)
    assert [r["bit"] for r in rows] == list(range(16))
    assert all(_bits(p).equal(before[n]) for n, p in lm.model.named_parameters())
    assert set(rows[0]) == {"bit", "ppl_random", "failed_random", "ppl_top", "failed_top"}
    assert not rows[0]["failed_random"] and rows[0]["ppl_random"] == pytest.approx(base, rel=0.05)
    assert isinstance(plot_positions(rows, baseline_ppl=base, failure_ppl=10 * base), Figure)
