"""First-order metrics: ``magnitude`` |w|, ``grad_x_weight`` |w ⊙ g| and ``grad_squared``.

g is the gradient of the mean calibration loss L = Σ_b (n_b / n) L_b over batches b.
``grad_squared`` is the empirical Fisher diagonal F = (1/N) Σ_i g_i², g_i the gradient of
window i's mean next-token NLL, over the N calibration windows: one backward pass per window
(whatever ``batch_size``), each squared gradient accumulated in place and freed at once.
"""

from __future__ import annotations

import dataclasses

import torch

from esa.metrics.registry import LossTerms, ScoreContext, register_metric


@register_metric("magnitude", needs_grad=False, needs_data=False, description="|w|")
def _magnitude(ctx: ScoreContext) -> dict:
    return {n: p.detach().to(ctx.score_dtype, copy=True).abs_() for n, p in ctx.items()}


@register_metric(
    "grad_x_weight", needs_grad=True, description="|w * g|, g the gradient of the mean calibration loss"
)
def _grad_x_weight(ctx: ScoreContext) -> dict:
    with ctx.first_order():
        grads = gradient_pass(ctx.loss_terms(), ctx.params, dtype=ctx.accumulate_dtype)
    return {n: g.mul_(p.detach()).abs_() for (n, p), g in zip(ctx.items(), grads)}


@register_metric(
    "grad_squared",
    needs_grad=True,
    description="empirical Fisher diagonal: mean over calibration windows of the squared "
    "per-window gradient (one backward pass per window, whatever batch_size)",
    version=2,  # v1: squared gradient of each batch mean
)
def _grad_squared(ctx: ScoreContext) -> dict:
    per_window = dataclasses.replace(ctx, batch_size=1)  # shares ctx.options (checkpointing)
    with ctx.first_order():
        sums = gradient_pass(
            per_window.loss_terms(weighted=False), ctx.params, square=True, dtype=ctx.accumulate_dtype
        )
    return {n: s.div_(per_window.n_batches) for n, s in zip(ctx.names, sums)}


def gradient_pass(
    loss_terms: LossTerms, params, square: bool = False, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Sum over terms of each term's gradient (``square=False``) or of its square (``square=True``),
    accumulated in place in ``dtype`` (fp32 by default).

    Each term is differentiated with ``backward()``; a post-accumulate hook on every parameter adds
    its fresh gradient into the accumulator and frees it at once, so at most a few parameter-sized
    gradients exist at any time (not a second copy of the model).
    """
    params = list(params)
    acc = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
    slots: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        slots.setdefault(id(p), []).append(i)

    def hook(param):
        g = param.grad
        param.grad = None
        if g is None:
            return
        for i in slots[id(param)]:
            if square:
                g32 = g.float()
                if acc[i].dtype == torch.float32:
                    acc[i].addcmul_(g32, g32)
                else:
                    acc[i].add_(g32.square())
            else:
                acc[i].add_(g)

    seen, handles = set(), []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            continue
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(hook))
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
    return acc
