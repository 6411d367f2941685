"""Tests for forward-over-reverse Hutchinson (esa.metrics.tangent): with the same probes it gives
the estimate of the double-backward paths, whatever the probe blocks, on quadratics and on every
tiny architecture (tied embeddings included); it leaves the model as it was; an op without forward
AD in its backward raises TangentUnsupported, and the metric then falls back to double backward."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data import random_windows
from esa.evaluate import lm_loss
from esa.metrics import curvature, tangent
from esa.metrics.registry import compute_scores, grad_scope
from esa.models import load_model

SETTINGS = settings(max_examples=10, deadline=None)


class _Quadratic(torch.nn.Module):
    """Parameters of the given shapes; ``terms()`` sum to 0.5 vᵀAv (v = all entries, float64)."""

    def __init__(self, seed: int, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes])
        n = sum(p.numel() for p in self.ps)
        a, a1 = (torch.randn(n, n, generator=gen, dtype=torch.float64) for _ in range(2))
        self.a, self.a1 = (a + a.T) / 2, (a1 + a1.T) / 2

    def terms(self):
        def term(m):
            return lambda: 0.5 * (v := torch.cat([p.reshape(-1) for p in self.ps])) @ m @ v

        return [term(self.a1), term(self.a - self.a1)]


@st.composite
def _blocks(draw):
    sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=8))
    return sizes, draw(st.one_of(st.none(), st.integers(1, 60)))


@given(_blocks())
def test_probe_blocks_partition_in_order_within_the_bound(case):
    sizes, bound = case
    blocks = tangent.probe_blocks(sizes, bound)
    assert [i for b in blocks for i in b] == list(range(len(sizes)))
    for b in blocks:
        held = sum(sizes[i] for i in b)
        assert len(b) == 1 or bound is None or held <= bound


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    samples=st.integers(1, 4),
    probe_seed=st.integers(0, 100),
    bound=st.integers(1, 12),
)
def test_tangent_equals_double_backward_on_quadratic(seed, samples, probe_seed, bound):
    """z ⊙ Hz from the gradient's tangent equals z ⊙ Hz from double backward, for one pass per
    probe and for probe blocks of at most ``bound`` entries (H z = Σ_b H z_b)."""
    quad = _Quadratic(seed, [(3, 2), (4,), (2, 3)])
    params = list(quad.ps)
    lean = curvature.hutchinson_diag(quad.terms(), params, samples, probe_seed, method="lean")
    for numel in (None, bound):
        est = curvature.hutchinson_diag(
            quad.terms(), params, samples, probe_seed, method="tangent", model=quad, max_probe_numel=numel
        )
        for x, y in zip(est, lean):  # fp32 accumulators, different summation orders
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
    assert all(isinstance(p, torch.nn.Parameter) and p.grad is None for p in quad.ps)


def test_tangent_estimate_falsified_when_the_probe_is_not_the_carried_one(monkeypatch):
    """The check above can fail: a tangent pass that carries another probe (z rolled by one
    entry) than the one it multiplies by gives another estimate."""
    quad = _Quadratic(0, [(3, 2), (4,)])
    params = list(quad.ps)
    lean = curvature.hutchinson_diag(quad.terms(), params, 2, 3, method="lean")
    real = tangent.fwAD.make_dual
    monkeypatch.setattr(tangent.fwAD, "make_dual", lambda w, z: real(w, z.flatten().roll(1).view_as(z)))
    est = curvature.hutchinson_diag(quad.terms(), params, 2, 3, method="tangent", model=quad)
    assert any(not torch.allclose(x, y, rtol=1e-3) for x, y in zip(est, lean))


def _setup(name: str):
    lm = load_model(name, device="cpu")
    calib = random_windows(4, 16, lm.model.config.vocab_size, seed=2)
    named = dict(lm.model.named_parameters(remove_duplicate=False))
    params = list({id(p): p for p in (named[n] for n in lm.param_map.scorable())}.values())
    model = lm.model
    return lm, params, lambda: [lambda b=b: lm_loss(model, b) * 0.5 for b in (calib[:2], calib[2:])]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia", "tiny-mixtral", "tiny-phi3"])
def test_tangent_equals_lean_on_tiny_models(name):
    lm, params, terms = _setup(name)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with grad_scope(lm.model, params), curvature.eager_kernels(lm.model):
        lean = curvature.hutchinson_diag(terms(), params, 2, seed=5, method="lean")
        est = curvature.hutchinson_diag(terms(), params, 2, seed=5, method="tangent", model=lm.model)
        blocks = curvature.hutchinson_diag(
            terms(), params, 2, seed=5, method="tangent", model=lm.model, max_probe_numel=params[0].numel()
        )
    for x, y, z in zip(est, blocks, lean):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-5 * float(z.abs().max()))
        torch.testing.assert_close(y, z, rtol=1e-4, atol=1e-5 * float(z.abs().max()))
    after = dict(lm.model.named_parameters())
    assert all(type(after[n]) is torch.nn.Parameter and torch.equal(after[n], w) for n, w in before.items())
    assert all(p.grad is None for p in lm.model.parameters())


def test_tied_embeddings_get_both_uses():
    """A tied input/output embedding is one parameter used twice: its z ⊙ Hz sums both uses."""
    lm, params, terms = _setup("tiny-llama")
    model = lm.model
    model.lm_head.weight = model.model.embed_tokens.weight
    params = list({id(p): p for p in model.parameters()}.values())
    with grad_scope(model, params), curvature.eager_kernels(model):
        lean = curvature.hutchinson_diag(terms(), params, 1, seed=1, method="lean")
        est = curvature.hutchinson_diag(terms(), params, 1, seed=1, method="tangent", model=model)
    for x, z in zip(est, lean):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-5 * float(z.abs().max()))


def test_unsupported_op_falls_back_to_double_backward(monkeypatch, caplog):
    """Without the silu rewrite the backward hits silu_backward, which has no forward AD: the
    estimator refuses (its partial sums discarded), and the metric warns and uses double backward."""
    lm, params, terms = _setup("tiny-llama")
    with grad_scope(lm.model, params), curvature.eager_kernels(lm.model):
        expected = curvature.hutchinson_diag(terms(), params, 1, seed=0, method="lean")
        monkeypatch.setattr(tangent, "_DECOMPOSED", {})
        with pytest.raises(tangent.TangentUnsupported, match="forward AD"):
            curvature.hutchinson_diag(terms(), params, 1, seed=0, method="tangent", model=lm.model)
    calib = random_windows(4, 16, lm.model.config.vocab_size, seed=2)
    names = lm.param_map.scorable()[:3]
    report: dict = {}
    with caplog.at_level(logging.WARNING, logger="esa"):
        got = compute_scores(
            lm, "hutchinson_diag", calib, names=names, hutchinson_samples=1, progress=False, report=report
        )
    assert "double backward instead" in caplog.text
    assert report["memory_plan"]["method"] == "lean"
    monkeypatch.undo()
    lean = compute_scores(
        lm,
        "hutchinson_diag",
        calib,
        names=names,
        hutchinson_samples=1,
        progress=False,
        hutchinson_method="lean",
    )
    assert all(torch.equal(got[n], lean[n]) for n in names)
    assert all(torch.isfinite(e).all() for e in expected)
