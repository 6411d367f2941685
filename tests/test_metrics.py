"""Tests for esa.metrics: hand-computed references through independent code paths, curvature
estimators on quadratics and a micro model, every tiny architecture, and state restoration."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data import prepare_data
from esa.errors import ConfigError
from esa.metrics import accumulate as _accumulate
from esa.metrics import curvature as _curvature
from esa.metrics.curvature import _signed_diag
from esa.metrics.registry import (
    METRICS,
    compute_scores,
    list_metrics,
    register_metric,
    score_summary,
)
from esa.models import from_module, load_model
from esa.models.tiny import tiny_models
from esa.util.runtime import seeded

TINY = tiny_models()
# the contract tests below run on every registered metric, so a new metric is covered when registered
BUILTIN = sorted(METRICS)
KNOWN = {"magnitude", "grad_x_weight", "grad_squared", "act_mag", "hutchinson_diag", "hessian_diag"}
WHOLE_MODEL = [m for m in BUILTIN if m != "hessian_diag"]  # hessian_diag: small requests only
SETTINGS = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="module")
def tiny():
    """name -> (LoadedModel, calibration windows [2, 32])."""
    out = {}
    for name in TINY:  # all tiny-* models share the builtin tokenizer: window the text once
        lm = load_model(name)
        if not out:
            calib = prepare_data(lm.tokenizer, None, max_length=32, max_samples=2).calibration(2, seed=0)
        out[name] = (lm, calib)
    return out


@pytest.fixture(scope="module")
def micro():
    """A one-layer Llama of width 16 (builtin vocabulary) and 2 short calibration windows."""
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


def _clear_grads(model):
    for p in model.parameters():
        p.grad = None


def _hf_grads(model, batch, names):
    """Gradients of transformers' own loss (an independent path from esa.evaluate.lm_loss)."""
    named = dict(model.named_parameters())
    _clear_grads(model)
    model(input_ids=batch, labels=batch).loss.backward()
    grads = {n: named[n].grad.detach().clone() for n in names}
    _clear_grads(model)
    return grads


def _assert_close(actual, expected, rel=1e-3):
    scale = expected.abs().max().item()
    assert torch.allclose(actual, expected, rtol=rel, atol=rel * scale + 1e-12), (
        (actual - expected).abs().max().item(),
        scale,
    )


# --- registry and validation ------------------------------------------------------------------


def test_registry_lists_builtin_metrics():
    assert set(METRICS) >= KNOWN
    rows = list_metrics()
    assert {r["name"] for r in rows} >= set(BUILTIN)
    assert all(isinstance(r["description"], str) and r["description"] for r in rows)
    assert METRICS["magnitude"].needs_grad is False and METRICS["grad_x_weight"].needs_grad is True


def test_register_metric_is_usable(tiny):
    lm, _calib = tiny["tiny-llama"]

    @register_metric("_test_twice", needs_grad=False, needs_data=False, description="2|w|")
    def _twice(ctx):
        return {n: 2 * p.detach().abs() for n, p in ctx.items()}

    try:
        name = lm.param_map.scorable()[0]
        scores = compute_scores(lm, "_test_twice", None, names=[name])
        assert torch.equal(scores[name], 2 * dict(lm.model.named_parameters())[name].detach().abs())
    finally:
        METRICS.pop("_test_twice")


def test_unknown_metric_raises(tiny):
    lm, calib = tiny["tiny-llama"]
    with pytest.raises(ConfigError, match="unknown metric 'x': choose one of"):
        compute_scores(lm, "x", calib)


@pytest.mark.parametrize(
    "bad", [torch.zeros(5, dtype=torch.long), torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long)]
)
def test_bad_calibration_raises(tiny, bad):
    lm, _ = tiny["tiny-llama"]
    with pytest.raises(ConfigError, match="calibration windows"):
        compute_scores(lm, "grad_x_weight", bad, progress=False)


def test_unknown_names_raise(tiny):
    lm, calib = tiny["tiny-llama"]
    with pytest.raises(ConfigError, match="unknown parameter"):
        compute_scores(lm, "magnitude", calib, names=["nope.weight"])


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_magnitude_is_abs_weight(rows, cols, seed):
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(cols, rows)
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    lm = from_module("m", model, None, "tiny")
    scores = compute_scores(lm, "magnitude", None, progress=False)
    assert list(scores) == ["proj.weight"]
    assert torch.equal(scores["proj.weight"], model.proj.weight.detach().abs())


# --- every tiny architecture -------------------------------------------------------------------


@pytest.mark.parametrize("metric", WHOLE_MODEL)
@pytest.mark.parametrize("name", TINY)
def test_every_tiny_model_scores(tiny, name, metric):
    lm, calib = tiny[name]
    scores = compute_scores(lm, metric, calib, progress=False, hutchinson_samples=2)
    named = dict(lm.model.named_parameters())
    assert list(scores) == lm.param_map.scorable()
    for n, s in scores.items():
        assert s.shape == named[n].shape and s.dtype == torch.float32 and s.device == named[n].device
        assert torch.isfinite(s).all() and (s >= 0).all(), n
    assert any(s.max() > 0 for s in scores.values())


@pytest.mark.parametrize("metric", BUILTIN)
def test_state_restored_after_scoring(tiny, micro, metric):
    # hessian_diag on one 16 x 16 tensor of the micro model (exact HVPs through MoE are slow)
    lm, calib = micro if metric == "hessian_diag" else tiny["tiny-mixtral"]
    model = lm.model
    named = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.v_proj.weight"] if metric == "hessian_diag" else None
    frozen = "model.norm.weight"
    named[frozen].requires_grad_(False)
    try:
        flags = {n: p.requires_grad for n, p in named.items()}
        before = {n: p.detach().clone() for n, p in named.items()}
        kernels = (model.config._attn_implementation, model.config._experts_implementation)
        compute_scores(lm, metric, calib, names=names, progress=False, hutchinson_samples=2)
        for n, p in named.items():
            assert p.grad is None, n
            assert p.requires_grad == flags[n], n
            assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n
        assert not model.training
        assert (model.config._attn_implementation, model.config._experts_implementation) == kernels
    finally:
        named[frozen].requires_grad_(True)


def test_score_dtype(tiny):
    lm, calib = tiny["tiny-llama"]
    scores = compute_scores(lm, "act_mag", calib, progress=False, score_dtype=torch.bfloat16)
    assert all(s.dtype == torch.bfloat16 for s in scores.values())


@pytest.mark.parametrize("metric", ["magnitude", "act_mag"])
def test_scores_built_at_once_keep_their_values_in_bf16_and_on_the_host(tiny, metric):
    """magnitude and act_mag cast each score as it is made: bf16 scores are the fp32 ones rounded;
    offload=True returns them on the CPU and reports every tensor in the plan."""
    lm, calib = tiny["tiny-mixtral"]
    fp32 = compute_scores(lm, metric, calib, progress=False)
    report: dict = {}
    bf16 = compute_scores(
        lm, metric, calib, progress=False, score_dtype=torch.bfloat16, offload=True, report=report
    )
    assert report["memory_plan"]["offloaded"] == len(fp32)
    for name, s in fp32.items():
        assert bf16[name].device.type == "cpu" and torch.equal(bf16[name], s.to(torch.bfloat16))


class _CudaParam:
    """Stands in for a CUDA parameter of ``n`` entries (host_scores reads only these)."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, n: int):
        self.n = n

    def numel(self) -> int:
        return self.n


@SETTINGS
@given(sizes=st.lists(st.integers(1, 2**28), min_size=1, max_size=12), free_gib=st.floats(0, 8))
def test_host_scores_keep_what_fits_on_the_device(sizes, free_gib):
    params = [_CudaParam(n) for n in sizes]
    free = int(free_gib * 2**30)
    with mock.patch.object(_accumulate, "available_bytes", lambda device, limit=None: free):
        host = _accumulate.host_scores(params, torch.bfloat16, None)
    kept = sum(2 * n for i, n in enumerate(sizes) if i not in host)
    work = _accumulate.SLACK_BYTES + 8 * max(sizes) + 2 * 2 * max((sizes[i] for i in host), default=0)
    assert kept + work <= free or len(host) == len(sizes)
    order = _accumulate.offload_order(len(sizes))
    assert host == frozenset(order[: len(host)])  # a prefix of the spread-out order: no more than needed
    if host:
        less = frozenset(order[: len(host) - 1])
        kept_less = sum(2 * n for i, n in enumerate(sizes) if i not in less)
        work_less = (
            _accumulate.SLACK_BYTES + 8 * max(sizes) + 2 * 2 * max((sizes[i] for i in less), default=0)
        )
        assert kept_less + work_less > free
    assert _accumulate.host_scores(params, torch.float32, True) == frozenset(range(len(sizes)))
    assert _accumulate.host_scores(params, torch.float32, False) == frozenset()


# --- first-order metrics against hand computations ----------------------------------------------


def test_grad_x_weight_matches_transformers_loss(tiny):
    lm, calib = tiny["tiny-llama"]
    names = lm.param_map.scorable()
    scores = compute_scores(lm, "grad_x_weight", calib, batch_size=1, progress=False)
    grads = _hf_grads(lm.model, calib, names)
    named = dict(lm.model.named_parameters())
    for n in names:
        _assert_close(scores[n], (named[n].detach() * grads[n]).abs())


def _brute_force_fisher(model, calib, names):
    """(1/N) Σ_i g_i², g_i from transformers' own loss on window i alone (an independent path)."""
    per_window = [_hf_grads(model, calib[i : i + 1], names) for i in range(calib.shape[0])]
    return {n: torch.stack([g[n] ** 2 for g in per_window]).mean(0) for n in names}


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_grad_squared_is_the_per_window_empirical_fisher(micro, batch_size):
    lm, calib = micro  # 4 windows: batch sizes 2, 3 and 8 group them differently, same Fisher
    names = lm.param_map.scorable()
    scores = compute_scores(lm, "grad_squared", calib, batch_size=batch_size, progress=False)
    expected = _brute_force_fisher(lm.model, calib, names)
    for n in names:
        _assert_close(scores[n], expected[n])
    squared_mean = _hf_grads(lm.model, calib, names[:1])[names[0]] ** 2  # what a batch gives
    assert not torch.allclose(scores[names[0]], squared_mean, rtol=1e-2)


def test_grad_squared_on_a_tiny_architecture(tiny):
    lm, calib = tiny["tiny-phi3"]
    names = lm.param_map.scorable()
    scores = compute_scores(lm, "grad_squared", calib, batch_size=2, progress=False)
    expected = _brute_force_fisher(lm.model, calib, names)
    for n in names:
        _assert_close(scores[n], expected[n])


def test_act_mag_matches_manual_hook(tiny):
    lm, calib = tiny["tiny-llama"]
    name = "model.layers.1.self_attn.q_proj.weight"
    module = lm.model.get_submodule(name.rsplit(".", 1)[0])
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            lm.model(input_ids=calib)
    finally:
        handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    expected = module.weight.detach().abs() * x.norm(dim=0)[None, :]
    scores = compute_scores(lm, "act_mag", calib, names=[name], progress=False, batch_size=1)
    _assert_close(scores[name], expected, rel=1e-4)


def test_act_mag_fused_experts_use_routed_tokens(tiny, monkeypatch):
    """Per-expert norms equal those of the inputs the eager experts loop feeds each expert."""
    lm, calib = tiny["tiny-mixtral"]
    experts = lm.model.model.layers[0].mlp.experts
    ptrs = {}
    for e in range(experts.num_experts):
        ptrs[experts.gate_up_proj[e].data_ptr()] = ("gate_up_proj", e)
        ptrs[experts.down_proj[e].data_ptr()] = ("down_proj", e)
    seen = {}
    linear = torch.nn.functional.linear

    def spy(x, w, *args, **kwargs):
        key = ptrs.get(w.data_ptr()) if w.ndim == 2 else None
        if key is not None and tuple(w.shape) == tuple(getattr(experts, key[0]).shape[1:]):
            seen.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        return linear(x, w, *args, **kwargs)

    impl = lm.model.config._experts_implementation
    lm.model.set_experts_implementation("eager")
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    try:
        with torch.no_grad():
            lm.model(input_ids=calib)
    finally:
        monkeypatch.undo()
        lm.model.set_experts_implementation(impl)
    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    scores = compute_scores(lm, "act_mag", calib, names=names, progress=False)
    assert len({e for _, e in seen}) > 1  # several experts got tokens
    for attr, n in zip(("gate_up_proj", "down_proj"), names):
        w = getattr(experts, attr).detach()
        for e in range(experts.num_experts):
            xs = seen.get((attr, e))
            norm = torch.cat(xs).norm(dim=0) if xs else torch.zeros(w.shape[2])
            _assert_close(scores[n][e], w[e].abs() * norm[None, :], rel=1e-4)


def test_act_mag_refuses_norm_weights(tiny):
    lm, calib = tiny["tiny-llama"]
    with pytest.raises(ConfigError, match="act_mag needs weights read by a linear layer"):
        compute_scores(lm, "act_mag", calib, names=["model.norm.weight"], progress=False)


# --- curvature -------------------------------------------------------------------------------


def _quadratic(draw_seed: int, shapes):
    """Parameters of the given shapes and loss terms summing to 0.5 vᵀAv (v = all entries)."""
    gen = torch.Generator().manual_seed(draw_seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    n = sum(p.numel() for p in params)
    b = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = (b + b.T) / 2
    a1 = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a1 = (a1 + a1.T) / 2
    parts = [a1, a - a1]  # two terms with the same probes must add up to A

    def term(m):
        return lambda: 0.5 * (v := torch.cat([p.reshape(-1) for p in params])) @ m @ v

    return params, a, [term(m) for m in parts]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n2=st.integers(1, 5), chunk=st.integers(1, 7))
def test_exact_hessian_diag_on_quadratic(seed, n2, chunk):
    params, a, terms = _quadratic(seed, [(2, 3), (n2,)])
    diag = _curvature.hessian_diag(terms, params, max_entries=100, chunk=chunk)
    torch.testing.assert_close(
        torch.cat([d.reshape(-1) for d in diag]).double(), a.diagonal(), rtol=1e-5, atol=1e-5
    )


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n2=st.integers(1, 4), probe_seed=st.integers(0, 1000))
def test_hutchinson_unbiased_on_quadratic(seed, n2, probe_seed):
    """Mean of z⊙Az over S Rademacher probes: entry i deviates from A_ii by the mean of terms
    bounded by r_i = Σ_{j≠i}|A_ij|, so Hoeffding gives |err_i| <= r_i·sqrt(2 ln(2/δ)/S)."""
    params, a, terms = _quadratic(seed, [(2, 2), (n2,)])
    samples = 600
    est = torch.cat([d.reshape(-1) for d in _curvature.hutchinson_diag(terms, params, samples, probe_seed)])
    off = a.abs().sum(1) - a.diagonal().abs()
    bound = off * math.sqrt(2 * math.log(2 / 1e-9) / samples) + 1e-6
    assert ((est.double() - a.diagonal()).abs() <= bound).all()


def test_unbatched_fallback_gives_the_same_diagonals(monkeypatch):
    """Where vmap has no batching rule, both estimators loop over vectors with equal results."""
    params, _a, terms = _quadratic(0, [(3, 2), (4,)])
    batched = (
        _curvature.hessian_diag(terms, params, 100, chunk=4),
        _curvature.hutchinson_diag(terms, params, 16, seed=1),
    )
    hvp = _curvature._hvp

    def no_vmap(*args, batched=False, **kwargs):
        if batched:
            raise RuntimeError("no batching rule")
        return hvp(*args, **kwargs)

    monkeypatch.setattr(_curvature, "_hvp", no_vmap)
    looped = (
        _curvature.hessian_diag(terms, params, 100, chunk=4),
        _curvature.hutchinson_diag(terms, params, 16, seed=1),
    )
    for x, y in zip(batched, looped):
        for u, v in zip(x, y):
            torch.testing.assert_close(u, v)


def test_hutchinson_approaches_hessian_diag(micro):
    """On a micro Llama the signed Hutchinson estimate converges to the exact diagonal; the error
    shrinks like 1/sqrt(samples) (≈1.8, 0.5, 0.18 here, deterministic given the seed)."""
    lm, calib = micro
    name = "model.layers.0.self_attn.v_proj.weight"
    exact = _signed_diag(lm, calib, "exact", names=[name])[name]
    assert exact.abs().max() > 0
    errors = {}
    for samples in (4, 64, 512):
        est = _signed_diag(lm, calib, "hutchinson", names=[name], hutchinson_samples=samples)[name]
        errors[samples] = ((est - exact).norm() / exact.norm()).item()
    assert errors[512] < errors[64] < errors[4]
    assert errors[512] < 0.3, errors
    scores = compute_scores(lm, "hessian_diag", calib, names=[name], progress=False)
    torch.testing.assert_close(scores[name], exact.abs())


def test_hutchinson_is_seeded(micro):
    lm, calib = micro
    name = "model.layers.0.mlp.down_proj.weight"
    a, b, c = (
        compute_scores(lm, "hutchinson_diag", calib, names=[name], seed=s, progress=False)[name]
        for s in (3, 3, 4)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hessian_diag_refuses_large_requests(tiny):
    lm, calib = tiny["tiny-llama"]
    with pytest.raises(ConfigError, match=r"hessian_diag is exact .* > limit 20000; restrict names="):
        compute_scores(lm, "hessian_diag", calib, progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ConfigError, match="> limit 100"):
        compute_scores(lm, "hessian_diag", calib, names=[name], max_entries=100, progress=False)


# --- summary ---------------------------------------------------------------------------------


def test_score_summary_numbers():
    values = torch.ones(10_000)
    values[:100] = 100.0
    summary = score_summary({"a": values[:4000].view(40, 100), "b": values[4000:]})
    assert summary["entries"] == 10_000 and summary["tensors"] == 2
    assert summary["max"] == 100.0 and summary["median"] == 1.0
    assert summary["top1pct_mean"] == 100.0 and summary["concentration"] == 100.0
    assert all(isinstance(v, (int, float, bool)) for v in summary.values())


def test_score_summary_samples_large_inputs():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(300, 100, generator=gen), "b": torch.rand(20_000, generator=gen)}
    s1, s2 = score_summary(scores, sample=5_000), score_summary(scores, sample=5_000)
    assert s1 == s2 and s1["sampled"] <= 5_001 and s1["entries"] == 50_000
    assert abs(s1["median"] - 0.5) < 0.05 and abs(s1["concentration"] - 1.99) < 0.1
    assert s1["max"] == max(float(t.max()) for t in scores.values())
