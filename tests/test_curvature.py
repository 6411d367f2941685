"""Tests for the lean curvature estimators at scale (esa.metrics.probes, esa.metrics.curvature):
the lean Hutchinson estimator (no whole-model gradient, probe or Hv kept) is unbiased on
quadratics, equals the retained-gradient estimator with the same probes, equals itself with
offloaded accumulators, and converges to the exact diagonal on a micro Llama; the exact
diagonal survives out-of-memory batches by halving them; the curvature plan on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data import prepare_data, random_windows
from esa.evaluate import lm_loss
from esa.metrics import curvature
from esa.metrics.curvature import _signed_diag
from esa.metrics.probes import ProbeDot, probe, saved_bytes
from esa.metrics.registry import compute_scores, grad_scope
from esa.models import from_module, load_model
from esa.util.runtime import seeded

SETTINGS = settings(max_examples=10, deadline=None)


def _quadratic(draw_seed: int, shapes):
    """Parameters of the given shapes and two loss terms summing to 0.5 vᵀAv (v = all entries)."""
    gen = torch.Generator().manual_seed(draw_seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    n = sum(p.numel() for p in params)
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = (b + b.T) / 2
    a1 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a1 = (a1 + a1.T) / 2

    def term(m):
        return lambda: 0.5 * (v := torch.cat([p.reshape(-1) for p in params])) @ m @ v

    return params, a, [term(a1), term(a - a1)]


@pytest.fixture(scope="module")
def micro():
    """A one-layer Llama of width 16 (builtin vocabulary) and 4 short calibration windows."""
    import transformers as tf

    from esa.models.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer()
    cfg = tf.LlamaConfig(
        vocab_size=1024,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with seeded(0):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    calib = prepare_data(tok, None, max_length=16, max_samples=2).calibration(4, seed=0)
    return from_module("micro", model, tok, "tiny"), calib


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n2=st.integers(1, 4), probe_seed=st.integers(0, 1000))
def test_lean_hutchinson_unbiased_on_quadratic(seed, n2, probe_seed):
    """Mean of z⊙Az over S probes: |err_i| <= r_i·sqrt(2 ln(2/δ)/S), r_i = Σ_{j≠i}|A_ij| (Hoeffding)."""
    params, a, terms = _quadratic(seed, [(2, 2), (n2,)])
    samples = 300
    est = curvature.hutchinson_diag(terms, params, samples, probe_seed, method="lean")
    est = torch.cat([d.reshape(-1) for d in est])
    off = a.abs().sum(1) - a.diagonal().abs()
    bound = off * math.sqrt(2 * math.log(2 / 1e-9) / samples) + 1e-9
    assert ((est - a.diagonal()).abs() <= bound).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), samples=st.integers(1, 6), probe_seed=st.integers(0, 100))
def test_lean_equals_retained_estimate_on_quadratic(seed, samples, probe_seed):
    params, _a, terms = _quadratic(seed, [(3, 2), (4,)])
    lean = curvature.hutchinson_diag(terms, params, samples, probe_seed, method="lean")
    kept = curvature.hutchinson_diag(terms, params, samples, probe_seed, method="retained")
    scale = max(float(y.abs().max()) for y in kept)
    for x, y in zip(lean, kept):  # both accumulate in fp32, in different orders
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize(("budget", "lean"), [(1, True), (10**6, False)])
def test_default_path_is_lean_when_probes_cannot_be_batched(monkeypatch, budget, lean):
    """One probe per batched product gains nothing from the retained gradient (a second
    model-sized copy with its graph): the default then takes the lean path."""
    params, _a, terms = _quadratic(0, [(3, 2), (4,)])
    called = []
    real = curvature.hutchinson_lean
    monkeypatch.setattr(curvature, "hutchinson_lean", lambda *a, **k: called.append(1) or real(*a, **k))
    curvature.hutchinson_diag(terms, params, 4, 0, budget=budget)
    assert bool(called) is lean


def _model_terms(lm, calib):
    model = lm.model
    return lambda: [lambda b=b: lm_loss(model, b) * 0.5 for b in (calib[:2], calib[2:])]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia"])
def test_lean_equals_retained_and_offloaded_on_a_model(name):
    lm = load_model(name, device="cpu")
    calib = random_windows(4, 16, lm.model.config.vocab_size, seed=2)
    named = dict(lm.model.named_parameters())
    params = [named[n] for n in lm.param_map.scorable()]
    terms = _model_terms(lm, calib)
    every = range(len(params))
    with grad_scope(lm.model, params), curvature.eager_kernels(lm.model):
        lean = curvature.hutchinson_diag(terms(), params, 2, seed=5, method="lean")
        moved = curvature.hutchinson_diag(terms(), params, 2, seed=5, method="lean", offload=every)
        kept = curvature.hutchinson_diag(terms(), params, 2, seed=5, method="retained")
    for x, y, z in zip(lean, moved, kept):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6 * float(z.abs().max()))
    assert all(p.grad is None for p in lm.model.parameters())


@pytest.mark.parametrize("method", ["lean", "tangent"])
def test_hutchinson_converges_to_the_exact_diagonal(micro, method):
    """Relative error of the estimate (lean: accumulators offloaded; tangent: forward-over-reverse)
    against hessian_diag shrinks like 1/sqrt(samples) on a micro Llama."""
    lm, calib = micro
    name = "model.layers.0.self_attn.v_proj.weight"
    exact = _signed_diag(lm, calib, "exact", names=[name])[name]
    errors = {}
    for samples in (4, 64, 512):
        est = _signed_diag(
            lm,
            calib,
            "hutchinson",
            names=[name],
            hutchinson_samples=samples,
            offload=True,
            hutchinson_method=method,
        )
        errors[samples] = float((est[name] - exact).norm() / exact.norm())
    assert errors[512] < errors[64] < errors[4], errors
    assert errors[512] < 0.3, errors
    assert errors[4] / errors[512] > 3  # ~sqrt(128) ≈ 11 expected


def test_probe_dot_gradient_is_the_probe():
    g = torch.randn(3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(ProbeDot.apply(g, 7, 2, 1) * 3.0, g)
    z = probe((3, 4), torch.float32, torch.device("cpu"), 7, 2, 1)
    assert torch.equal(grad, 3.0 * z) and set(z.unique().tolist()) == {-1.0, 1.0}


def test_hessian_diag_halves_batches_that_run_out_of_memory(monkeypatch):
    params, a, terms = _quadratic(3, [(4, 5), (6,)])
    block = curvature._diagonal_block
    sizes = []

    def small_only(diag, grads, ps, offsets, start, stop, batched):
        sizes.append(stop - start)
        if stop - start > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return block(diag, grads, ps, offsets, start, stop, batched)

    monkeypatch.setattr(curvature, "_diagonal_block", small_only)
    diag = curvature.hessian_diag(terms, params, max_entries=100, chunk=16)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in diag]).double(), a.diagonal())
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 4


def test_curvature_plan_and_report_on_cpu(micro):
    lm, calib = micro
    name = "model.layers.0.mlp.down_proj.weight"
    report: dict = {}
    args = dict(names=[name], batch_size=3, progress=False, hutchinson_samples=1, report=report)
    compute_scores(lm, "hutchinson_diag", calib, **args)
    # one window per term on the CPU, whatever batch_size (the same estimate); the whole probe
    # in one forward-over-reverse pass when it fits
    assert report["memory_plan"] == {
        "checkpoint": False,
        "offloaded": 0,
        "batch_size": 1,
        "method": "tangent",
        "probe_numel": None,
    }
    compute_scores(lm, "hutchinson_diag", calib, offload=True, **args)
    assert report["memory_plan"]["offloaded"] == 1


def test_memory_limit_splits_the_probe_on_cpu(micro, caplog):
    """Under a limit with no room for the probe, each pass carries one tensor's probe (with a
    warning); the scores are the ones of the unlimited plan (up to float rounding)."""
    lm, calib = micro
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    args = dict(names=names, progress=False, hutchinson_samples=2)
    free = compute_scores(lm, "hutchinson_diag", calib, **args)
    report: dict = {}
    with caplog.at_level("WARNING", logger="esa"):
        tight = compute_scores(lm, "hutchinson_diag", calib, memory_limit=1, report=report, **args)
    assert report["memory_plan"]["probe_numel"] == 16 * 32
    assert "carrying one tensor's probe per pass" in caplog.text and "in 2 passes per probe" in caplog.text
    for n in names:
        torch.testing.assert_close(tight[n], free[n], rtol=1e-5, atol=1e-7 * float(free[n].max()))


def test_saved_bytes_counts_activations_not_weights(micro):
    """What a forward keeps for its backward grows with the tokens and excludes the weights."""
    lm, calib = micro
    params = list(lm.model.parameters())
    with grad_scope(lm.model, params):
        one, two = (saved_bytes(lm.model, calib[:n]) for n in (1, 2))
    weights = sum(p.numel() * p.element_size() for p in params)
    assert 0 < one < two <= 2.2 * one
    assert one < weights  # 16 tokens of width 16: far less than the 1024 x 16 embedding alone
