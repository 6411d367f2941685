"""Curvature metrics: ``hutchinson_diag`` and ``hessian_diag``, |diag(H)| of the mean calibration
loss, by Hessian-vector products Hv = ∇(∇L · v).

Hutchinson: diag(H) ≈ (1/S) Σ_s z_s ⊙ H z_s over seeded Rademacher z_s; exact: (H e_i)_i for every
unit vector e_i (one HVP per entry, small requests only). The metrics score by the magnitude of the
diagonal (a negative diagonal is curvature too); ``_signed_diag`` gives the signed values. They
need double backward, so attention (and fused-expert) kernels are switched to "eager" for their
duration and restored after.

The estimators take ``loss_terms``: an iterable of zero-argument callables, each returning one
differentiable (already weighted) term of the total loss, so they work on any scalar loss (the LM
calibration loss, one term per batch, or a quadratic in tests). The Hessian of the total is the sum
of the terms' Hessians, so every term is differentiated with the same probe vectors.

Hutchinson computes H z three ways, with the same probes and the same estimate: forward-over-reverse
(``esa.metrics.tangent``, the default on the CPU: no double-backward graph), lean double backward
(``esa.metrics.probes``, the default on CUDA) and the retained-gradient path here (which batches
probes through vmap for small models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch

from esa.errors import ConfigError
from esa.metrics.probes import curvature_plan, hutchinson_lean, probe
from esa.metrics.registry import (
    HESSIAN_MAX_ENTRIES,
    METRICS,
    LossTerms,
    ScoreContext,
    register_metric,
    run_metric,
    score_context,
)
from esa.metrics.tangent import TangentUnsupported, hutchinson_tangent, probe_blocks

log = logging.getLogger("esa")

_HVP_CHUNK = 128  # unit vectors per batched Hessian-vector product in the exact diagonal
_PROBE_BUDGET = 1 << 22  # Hutchinson probes x entries per batched Hessian-vector product


@contextlib.contextmanager
def eager_kernels(model: torch.nn.Module):
    """Switch attention (and fused-expert) kernels to "eager" for double backward, then restore.

    sdpa/flash attention kernels (CPU flash included) have no double-backward formula.
    """
    config = getattr(model, "config", None)
    changes = []
    for attr, setter in (
        ("_attn_implementation", "set_attn_implementation"),
        ("_experts_implementation", "set_experts_implementation"),
    ):
        current = getattr(config, attr, None) if config is not None else None
        if current in (None, "eager") or not hasattr(model, setter):
            continue
        try:
            getattr(model, setter)("eager")
        except Exception as exc:
            log.warning("esa: could not switch %s to eager (%s); double backward may fail", attr, exc)
            continue
        changes.append((setter, current))
    try:
        yield
    finally:
        for setter, current in reversed(changes):
            getattr(model, setter)(current)


def _grads(loss: torch.Tensor, params, create_graph: bool = False):
    out = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def _hvp(grads, params, vectors, retain_graph: bool, batched: bool = False):
    """H v for the graph of ``grads`` (built with create_graph); zero where unconnected."""
    pairs = [(g, v) for g, v in zip(grads, vectors) if g.requires_grad]
    if not pairs:
        return [torch.zeros_like(v) for v in vectors]
    if batched:
        out = torch.autograd.grad(
            [g for g, _ in pairs],
            params,
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
    else:
        dot = sum((g * v).sum() for g, v in pairs)
        out = torch.autograd.grad(dot, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(v) if h is None else h for h, v in zip(out, vectors)]


def _rademacher(params, seed: int, sample: int) -> list[torch.Tensor]:
    """The ±1 probe of ``sample``: a fixed function of (seed, sample, tensor position)."""
    return [probe(p.shape, p.dtype, p.device, seed, sample, i) for i, p in enumerate(params)]


def hutchinson_diag(
    loss_terms: LossTerms,
    params,
    samples: int,
    seed: int,
    budget: int = _PROBE_BUDGET,
    method: str | None = None,
    offload=(),
    model: torch.nn.Module | None = None,
    max_probe_numel: int | None = None,
) -> list[torch.Tensor]:
    """Signed Hutchinson estimate of diag(H): mean over ``samples`` Rademacher z of z ⊙ Hz.

    The same z (regenerated from ``(seed, sample)``) is used for every loss term, so the result is
    exactly the estimate for the Hessian of the summed loss, whichever ``method`` computes H z:

    - ``"tangent"`` (needs ``model``, whose parameters ``params`` are): forward-over-reverse,
      ``esa.metrics.tangent``; no double-backward graph; ``max_probe_numel`` bounds the probe
      entries carried per pass (``None``: all, one pass per probe and term);
    - ``"lean"``: double backward through hooks, ``esa.metrics.probes``: the weights, the
      accumulators (those at positions in ``offload`` in host memory) and one term's
      double-backward graph;
    - ``"retained"``: the gradient of each term is kept (a second model-sized copy with its
      graph) and probes go through one batched Hessian-vector product, ``probes × entries <=
      budget`` at a time.

    Default: tangent when a model is given; else lean on CUDA, with ``offload`` or when fewer
    than 2 probes fit one batched product; else retained.
    """
    if samples < 1:
        raise ConfigError(f"hutchinson_samples={samples} must be >= 1")
    params = list(params)
    chunk = max(1, min(samples, budget // max(1, sum(p.numel() for p in params))))
    if method is None:
        if model is not None:
            method = "tangent"
        else:  # batching probes is the retained path's only gain: without it, lean
            lean = bool(offload) or chunk == 1 or any(p.is_cuda for p in params)
            method = "lean" if lean else "retained"
    if method == "tangent":
        if model is None:
            raise ConfigError("hutchinson_diag(method='tangent') needs the model")
        return hutchinson_tangent(loss_terms, model, params, samples, seed, max_probe_numel, offload)
    if method == "lean":
        return hutchinson_lean(loss_terms, params, samples, seed, offload)
    if method != "retained":
        raise ConfigError(f"hutchinson method {method!r}: use 'tangent', 'lean' or 'retained'")
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    batched = True
    for term in loss_terms:
        grads = _grads(term(), params, create_graph=True)
        for start in range(0, samples, chunk):
            probes = [_rademacher(params, seed, s) for s in range(start, min(samples, start + chunk))]
            products = None
            if len(probes) > 1 and batched:
                z = [torch.stack(zs) for zs in zip(*probes)]
                try:
                    products = [(z, _hvp(grads, params, z, retain_graph=True, batched=True))]
                except RuntimeError as exc:  # an op without a batching rule: one probe at a time
                    log.info("esa: batched HVP unavailable (%s); one probe at a time", exc)
                    batched = False
            if products is None:
                products = [
                    ([zi[None] for zi in z], [h[None] for h in _hvp(grads, params, z, retain_graph=True)])
                    for z in probes
                ]
            for z, hz in products:
                for a, zi, hi in zip(acc, z, hz):
                    a.add_((zi.float() * hi.detach().float()).sum(0))
        del grads
    return [a.div_(samples) for a in acc]


def hessian_diag(
    loss_terms: LossTerms, params, max_entries: int, chunk: int = _HVP_CHUNK
) -> list[torch.Tensor]:
    """Exact signed diag(H) by Hessian-vector products with unit vectors, ``chunk`` at a time
    through one batched (vmapped) HVP; halved while that runs out of memory (a tensor of layer 0
    of an 8B model: its batched HVP spans the whole model), one vector at a time where an op
    has no batching rule."""
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if total > max_entries:
        raise ConfigError(
            f"hessian_diag is exact and costs one Hessian-vector product per weight: {total} entries "
            f"> limit {max_entries}; restrict names=... or use hutchinson_diag"
        )
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    diag = torch.zeros(total, dtype=torch.float64)
    batched = True
    for term in loss_terms:
        grads = _grads(term(), params, create_graph=True)
        start = 0
        while start < total:
            stop = min(total, start + chunk)
            oom = False
            try:
                _diagonal_block(diag, grads, params, offsets, start, stop, batched)
                start = stop
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk, oom = max(1, chunk // 2), True
            except RuntimeError as exc:  # an op without a batching rule: one vector at a time
                if not batched:
                    raise
                log.info("esa: batched HVP unavailable (%s); looping over unit vectors", exc)
                batched = False
            if oom:  # outside the handler, so the failed batch's tensors are gone
                torch.cuda.empty_cache()
                log.info("esa: batched HVP out of memory; %d unit vectors per product", chunk)
        del grads
    return [
        diag[offsets[i] : offsets[i + 1]].view(p.shape).to(torch.float32).to(p.device)
        for i, p in enumerate(params)
    ]


def _diagonal_block(diag, grads, params, offsets, start: int, stop: int, batched: bool) -> None:
    """diag[start:stop] += (H e_j)_j for the unit vectors e_start … e_{stop-1}, one batched HVP
    (``batched``) or one HVP per vector."""
    vecs = [_unit_block(p, offsets[i], start, stop) for i, p in enumerate(params)]
    if batched:
        hv = _hvp(grads, params, vecs, retain_graph=True, batched=True)
    else:
        rows = [_hvp(grads, params, [v[j] for v in vecs], retain_graph=True) for j in range(stop - start)]
        hv = [torch.stack([r[i] for r in rows]) for i in range(len(params))]
    _take_diagonal(diag, hv, offsets, start, stop)


def _unit_block(p, offset: int, start: int, stop: int) -> torch.Tensor:
    """Rows j = 0..stop-start-1 of unit vectors e_{start+j}, restricted to the tensor ``p``."""
    k = stop - start
    block = torch.zeros(k, p.numel(), dtype=p.dtype, device=p.device)
    lo, hi = max(start, offset), min(stop, offset + p.numel())
    if lo < hi:
        coords = torch.arange(lo, hi, device=p.device)
        block[coords - start, coords - offset] = 1
    return block.view(k, *p.shape)


def _take_diagonal(diag, hv, offsets, start: int, stop: int) -> None:
    for i, h in enumerate(hv):
        lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
        if lo >= hi:
            continue
        coords = torch.arange(lo, hi)
        flat = h.detach().reshape(stop - start, -1).cpu().double()
        diag[lo:hi] += flat[coords - start, coords - offsets[i]]


# --- metrics ---------------------------------------------------------------------------------


def _hutchinson_signed(ctx: ScoreContext) -> dict:
    with eager_kernels(ctx.model):
        plan = curvature_plan(ctx)
        terms = dataclasses.replace(ctx, batch_size=plan.batch_size)
        run = functools.partial(
            hutchinson_diag,
            params=ctx.params,
            samples=ctx.hutchinson_samples,
            seed=ctx.seed,
            offload=plan.offload,
            model=ctx.model,
            max_probe_numel=plan.probe_numel,
        )
        if plan.probe_numel is not None:
            blocks = len(probe_blocks([p.numel() for p in ctx.params], plan.probe_numel))
            log.warning(
                "esa: hutchinson_diag in %d passes per probe and window to fit the memory limit", blocks
            )
        try:
            est = run(terms.loss_terms(), method=plan.method)
        except TangentUnsupported as exc:
            log.warning("esa: hutchinson_diag by double backward instead (%s)", exc)
            ctx.options["plan"] = plan = dataclasses.replace(plan, method="lean", probe_numel=None)
            est = run(terms.loss_terms(), method="lean")
    return dict(zip(ctx.names, est))


def _hessian_signed(ctx: ScoreContext) -> dict:
    total = sum(p.numel() for p in ctx.params)
    if total > ctx.max_entries:  # refuse before any forward pass
        raise ConfigError(
            f"hessian_diag is exact and costs one Hessian-vector product per weight: {total} entries "
            f"> limit {ctx.max_entries}; restrict names=... or use hutchinson_diag"
        )
    with eager_kernels(ctx.model):
        plan = curvature_plan(ctx, accumulators=False)
        terms = dataclasses.replace(ctx, batch_size=plan.batch_size).loss_terms()
        diag = hessian_diag(terms, ctx.params, ctx.max_entries)
    return dict(zip(ctx.names, diag))


@register_metric(
    "hutchinson_diag",
    needs_grad=True,
    description="|diag(H)| by Hutchinson: mean of z*Hz over seeded Rademacher z",
)
def _hutchinson(ctx: ScoreContext) -> dict:
    return {n: v.abs_() for n, v in _hutchinson_signed(ctx).items()}


@register_metric(
    "hessian_diag",
    needs_grad=True,
    description=f"|diag(H)| exactly, one HVP per weight (<= {HESSIAN_MAX_ENTRIES} entries)",
)
def _hessian(ctx: ScoreContext) -> dict:
    return {n: v.abs_() for n, v in _hessian_signed(ctx).items()}


def _signed_diag(lm, calib, which: str = "hutchinson", **options) -> dict[str, torch.Tensor]:
    """Signed diag(H) estimates (``which`` = "hutchinson" or "exact"); options as compute_scores."""
    fn = {"hutchinson": _hutchinson_signed, "exact": _hessian_signed}[which]
    spec = METRICS["hutchinson_diag" if which == "hutchinson" else "hessian_diag"]
    defaults = dict(
        seed=0,
        batch_size=4,
        hutchinson_samples=8,
        progress=False,
        max_entries=HESSIAN_MAX_ENTRIES,
        desc=f"signed {which}",
    )
    names = options.pop("names", None)
    ctx = score_context(lm, spec, calib, names, **{**defaults, **options})
    return run_metric(ctx, fn, True)
