"""First-order metrics: ``magnitude`` |w|, ``grad_x_weight`` |w ⊙ g| and ``grad_squared``.

g is the gradient of the mean calibration loss L = Σ_b (n_b / n) L_b over batches b.
``grad_squared`` is the empirical Fisher diagonal F = (1/N) Σ_i g_i², g_i the gradient of
window i's mean next-token NLL, over the N calibration windows: one backward pass per window
(whatever ``batch_size``), each squared gradient accumulated in place and freed at once.

Accumulation is in fp32 (bf16 in lean mode, ``score_dtype=bf16``); the pass's ``MemoryPlan``
(``ScoreContext.first_order``) may keep some accumulators in host memory (``esa.metrics.accumulate``):
the sums are the same, bit for bit, and those scores are returned on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from esa.metrics.accumulate import Accumulators
from esa.metrics.registry import LossTerms, ScoreContext, register_metric


@register_metric("magnitude", needs_grad=False, needs_data=False, description="|w|")
def _magnitude(ctx: ScoreContext) -> dict:
    return ctx.placed_scores(lambda _n, p: p.detach().to(ctx.score_dtype, copy=True).abs_())


@register_metric(
    "grad_x_weight", needs_grad=True, description="|w * g|, g the gradient of the mean calibration loss"
)
def _grad_x_weight(ctx: ScoreContext) -> dict:
    def finish(g: torch.Tensor, i: int) -> None:
        g.mul_(ctx.params[i].detach()).abs_()

    with ctx.first_order() as plan:
        scores = gradient_pass(
            ctx.loss_terms(), ctx.params, dtype=ctx.accumulate_dtype, offload=plan.offload, finish=finish
        )
    return dict(zip(ctx.names, scores))


@register_metric(
    "grad_squared",
    needs_grad=True,
    description="empirical Fisher diagonal: mean over calibration windows of the squared "
    "per-window gradient (one backward pass per window, whatever batch_size)",
    version=2,  # v1: squared gradient of each batch mean
)
def _grad_squared(ctx: ScoreContext) -> dict:
    per_window = dataclasses.replace(ctx, batch_size=1)  # shares ctx.options (checkpointing)
    with per_window.first_order() as plan:
        sums = gradient_pass(
            per_window.loss_terms(weighted=False),
            ctx.params,
            square=True,
            dtype=ctx.accumulate_dtype,
            offload=plan.offload,
            finish=lambda s, _i: s.div_(per_window.n_batches),
        )
    return dict(zip(ctx.names, sums))


def gradient_pass(
    loss_terms: LossTerms,
    params,
    square: bool = False,
    dtype: torch.dtype = torch.float32,
    offload=(),
    finish: Callable[[torch.Tensor, int], object] | None = None,
) -> list[torch.Tensor]:
    """Sum over terms of each term's gradient (``square=False``) or of its square (``square=True``),
    accumulated in place in ``dtype`` (fp32 by default), in host memory for the parameter
    positions in ``offload`` (``esa.metrics.accumulate.Accumulators``); ``finish(sum, i)``, if
    given, then transforms each sum in place (on the device, offloaded ones included).

    Each term is differentiated with ``backward()``; a post-accumulate hook on every parameter adds
    its fresh gradient into the accumulator and frees it at once, so at most a few parameter-sized
    gradients exist at any time (not a second copy of the model).
    """
    params = list(params)
    slots: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        slots.setdefault(id(p), []).append(i)
    with Accumulators(params, dtype, offload) as acc:

        def hook(param):
            g = param.grad
            param.grad = None
            if g is None:
                return
            for i in slots[id(param)]:
                acc.add(i, g, square)

        handles = param_hooks(params, hook)
        try:
            for term in loss_terms:
                loss = term()
                if loss.requires_grad:
                    loss.backward()
                del loss
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.grad = None
        return acc.finish(finish) if finish is not None else acc.result()


def param_hooks(params, hook) -> list:
    """``hook(param)`` as a post-accumulate-grad hook on each distinct parameter that requires grad
    (``.grad`` cleared first); returns the handles."""
    seen, handles = set(), []
    for p in params:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles
