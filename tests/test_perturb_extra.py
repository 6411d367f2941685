"""Tests for esa.perturb_extra: adaptive noise, magnitude scaling and quantization against their
formulas (brute force), their ``changes`` masks, bad input, and the registry. The bit-exact restore
of every registered method is tested in tests/test_perturb.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.cli import main
from esa.errors import ConfigError
from esa.perturb import PERTURBATIONS, changeable, perturbed, resolve_scale
from esa.perturb_extra import quant_levels
from esa.select import select
from esa.util.sampling import tensor_seed

EXTRA = ("adaptive_noise", "magnitude_scaling", "quantization", "quantization_per_row")


def _param(values) -> dict[str, torch.nn.Parameter]:
    return {"w": torch.nn.Parameter(torch.as_tensor(values, dtype=torch.float32).clone())}


def _rows_of_different_scale(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 40, generator=gen) * torch.tensor([[0.01], [1.0], [100.0]])


def _grid(w: np.ndarray, bits: int, absmax) -> np.ndarray:
    """Brute-force symmetric absmax quantization in float64."""
    levels = 2 ** (bits - 1) - 1
    step = np.asarray(absmax, dtype=np.float64) / levels
    return np.clip(np.round(w / step), -levels, levels) * step


def test_registered_with_defaults_and_listed_by_esa_metrics(capsys):
    assert set(EXTRA) <= set(PERTURBATIONS)
    assert [resolve_scale(m) for m in EXTRA] == [0.02, 2.0, 4.0, 4.0]
    assert PERTURBATIONS["adaptive_noise"].random and not PERTURBATIONS["quantization"].random
    assert main(["metrics"]) == 0
    listed = {
        line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("perturbation")
    }
    assert set(EXTRA) <= listed


def test_adaptive_noise_sigma_is_the_row_rms():
    w = _rows_of_different_scale()
    params = _param(w)
    idx = torch.tensor([3, 41, 45, 100, 119])  # rows 0, 1, 1, 2, 2
    rms = w.pow(2).mean(dim=1).sqrt()[idx // 40]
    eps = torch.randn(idx.numel(), generator=torch.Generator().manual_seed(tensor_seed(5, "w")))
    with perturbed(params, {"w": idx}, "adaptive_noise", scale=0.3, seed=5):
        delta = params["w"].detach().reshape(-1)[idx] - w.reshape(-1)[idx]
    torch.testing.assert_close(delta, 0.3 * rms * eps, rtol=1e-5, atol=1e-6)


def test_adaptive_noise_on_an_outlier_is_on_its_neighbours_scale():
    w = torch.full((1, 64), 0.01)
    w[0, 5] = 10.0  # an outlier dominating its row's RMS
    rms = float(w.pow(2).mean().sqrt())
    params = _param(w)
    with perturbed(params, {"w": torch.tensor([0, 5])}, "adaptive_noise", scale=0.5, seed=1):
        delta = (params["w"].detach() - w).reshape(-1)[[0, 5]].abs()
    assert float(delta[0]) > 0.01  # a small weight gets noise far above its own size ...
    assert float(delta[1]) < 5.0 * 0.5 * rms  # ... the outlier noise on the row's scale


def test_adaptive_noise_changes_rows_with_nonzero_rms_only():
    w = torch.zeros(3, 4)
    w[1, 2] = 1.0
    mask = changeable(_param(w), "adaptive_noise", scale=0.1)["w"]
    assert mask.tolist() == [[False] * 4, [True] * 4, [False] * 4]
    assert not bool(changeable(_param(w), "adaptive_noise", scale=0.0)["w"].any())


def test_magnitude_scaling_keeps_signs_and_needs_a_positive_factor():
    w = torch.tensor([[-2.0, 0.0, 3.0]])
    params = _param(w)
    with perturbed(params, {"w": torch.arange(3)}, "magnitude_scaling", scale=2.5) as info:
        assert params["w"].detach().tolist() == [[-5.0, 0.0, 7.5]]
        assert info.n_changed == 2
    assert changeable(params, "magnitude_scaling", scale=2.5)["w"].tolist() == [[True, False, True]]
    with (
        pytest.raises(ConfigError, match="must be > 0"),
        perturbed(params, {"w": torch.arange(3)}, "magnitude_scaling", scale=-1.0),
    ):
        pass


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [False, True])
def test_quantization_matches_brute_force(bits, per_row):
    w = _rows_of_different_scale(seed=bits)
    params = _param(w)
    idx = torch.tensor([0, 7, 40, 79, 80, 119])
    method = "quantization_per_row" if per_row else "quantization"
    ref = w.double().numpy()
    absmax = np.abs(ref).max(axis=1, keepdims=True) if per_row else np.abs(ref).max()
    expected = _grid(ref, bits, absmax).reshape(-1)[idx.numpy()]
    with perturbed(params, {"w": idx}, method, scale=float(bits)):
        now = params["w"].detach()
        np.testing.assert_allclose(now.reshape(-1)[idx].numpy(), expected, rtol=1e-6, atol=1e-12)
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(now.reshape(-1)[untouched], w.reshape(-1)[untouched])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(0, 1000), st.booleans())
def test_quantization_error_is_at_most_half_a_step(bits, seed, per_row):
    w = _rows_of_different_scale(seed)
    params = _param(w)
    everything = {"w": torch.arange(w.numel())}
    absmax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
    step = absmax / quant_levels(bits)
    with perturbed(params, everything, "quantization_per_row" if per_row else "quantization", scale=bits):
        err = (params["w"].detach() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-5)).all())


def test_quantization_changes_only_off_grid_entries():
    w = torch.tensor([[7.0, 3.0, 3.5, 0.3], [0.0, 0.0, 0.0, 0.0]])  # 4 bits per tensor: step 1
    mask = changeable(_param(w), "quantization", scale=4)["w"]
    assert mask.tolist() == [[False, False, True, True], [False] * 4]
    per_row = changeable(_param(w), "quantization_per_row", scale=4)["w"]
    assert per_row.tolist() == [[False, False, True, True], [False] * 4]  # a zero row stays as it is
    eligible = changeable(_param(w), "quantization", scale=4)
    picked = select({"w": torch.ones(2, 4)}, 2, kind="random", seed=0, eligible=eligible)
    assert sorted(picked.indices["w"].tolist()) == [2, 3]


def test_quantization_per_row_on_a_non_contiguous_parameter():
    base = torch.tensor([[1.0, 100.0], [0.3, 40.0], [0.6, 10.0]])
    p = torch.nn.Parameter(base.t())  # logical shape [2, 3], rows [1, .3, .6] and [100, 40, 10]
    assert not p.is_contiguous()
    with perturbed({"p": p}, {"p": torch.tensor([1, 4])}, "quantization_per_row", scale=2):
        assert torch.equal(p.detach(), torch.tensor([[1.0, 0.0, 0.6], [100.0, 0.0, 10.0]]))
    assert torch.equal(p.detach(), base.t())


@pytest.mark.parametrize("bits", [1, 17, 2.5, float("nan"), 0, -4, True])
def test_quantization_rejects_bad_bit_counts_and_restores(bits):
    w = _rows_of_different_scale()
    params = _param(w)
    with (
        pytest.raises(ConfigError, match=r"--bits|finite"),
        perturbed(params, {"w": torch.arange(5)}, "quantization", scale=bits),
    ):
        pass
    assert torch.equal(params["w"].detach(), w)
