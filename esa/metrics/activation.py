"""Activation metric ``act_mag`` (Wanda): |W_ij|·‖X_j‖₂, ‖X_j‖₂ the L2 norm of input channel j
over all calibration tokens reaching that weight.

Forward hooks sum X_j² per reading module: a linear layer (or router) sees its inputs; a fused
3-D experts module gets per-expert sums over the tokens routed to each expert (``esa.models.moe``
replays the routing), of the hidden states for ``gate_up_proj``/``up_proj`` and of the gated
activations for ``down_proj``. The LM head, if asked for, sees the L-1 predicting positions of each
window (the loss never feeds it the last one).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from esa.errors import ConfigError
from esa.metrics.registry import ScoreContext, register_metric
from esa.models import moe

log = logging.getLogger("esa")

Sums = dict[tuple[str, str], torch.Tensor]  # (module name, "linear" | "in" | "mid") -> Σ x²


@register_metric(
    "act_mag",
    needs_grad=False,
    description="Wanda: |W_ij| * L2 norm of input channel j over calibration tokens",
)
def _act_mag(ctx: ScoreContext) -> dict:
    modules = dict(ctx.model.named_modules())
    plan: dict[str, tuple[str, str]] = {}  # param -> (reading module, part)
    owners: dict[str, tuple[Any, set[str]]] = {}  # reading module -> (module, parts)
    for name, p in ctx.items():
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        kind = ctx.lm.param_map[name].kind if name in ctx.lm.param_map else None
        if attr == "weight" and p.ndim == 2 and (isinstance(mod, torch.nn.Linear) or kind == "router"):
            plan[name] = (mod_name, "linear")
        elif p.ndim == 3 and attr in moe.EXPERT_PARAMS and moe.is_fused_experts(mod):
            plan[name] = (mod_name, "mid" if attr == "down_proj" else "in")
        else:
            raise ConfigError(
                f"act_mag needs weights read by a linear layer: {name} "
                f"({type(mod).__name__}, shape {tuple(p.shape)}) is not one; "
                "drop it from names= or use another metric"
            )
        owners.setdefault(mod_name, (mod, set()))[1].add(plan[name][1])
    sums: Sums = {}
    hooks = []
    try:
        for mod_name, (mod, parts) in owners.items():
            hook = _linear_hook if "linear" in parts else _experts_hook("mid" in parts)
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, kw, out, k=mod_name, h=hook: h(m, a, kw, sums, k), with_kwargs=True
                )
            )
        with torch.inference_mode():
            for term in ctx.loss_terms():
                term()
    finally:
        for h in hooks:
            h.remove()
    return ctx.placed_scores(lambda n, p: _wanda(n, p, plan[n], sums, ctx.model))


def _accumulate(sums: Sums, key: tuple[str, str], value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def _linear_hook(mod, args, kwargs, sums: Sums, key: str) -> None:
    x = args[0] if args else next(iter(kwargs.values()))
    n_in = mod.weight.shape[1]
    if x.shape[-1] != n_in:
        raise ConfigError(
            f"act_mag: {key} reads inputs of width {x.shape[-1]}, not its weight's "
            f"{n_in} columns; drop it from names= or use another metric"
        )
    _accumulate(sums, (key, "linear"), x.detach().reshape(-1, n_in).float().pow(2).sum(0))


def _experts_hook(want_mid: bool):
    """Per-expert Σ count·x² of the routed tokens (a token routed twice to e is processed twice),
    and of their gated activations (the input of down_proj) when ``want_mid``."""

    def hook(mod, args, kwargs, sums: Sums, key: str) -> None:
        routed = moe.routing(args, kwargs)
        if routed is None:
            raise ConfigError(
                f"act_mag: cannot see the routing of {key} (no top_k_index input): "
                "drop its expert tensors from names= or use another metric"
            )
        x = routed[0]
        s_in = torch.zeros(mod.num_experts, x.shape[1], dtype=torch.float32, device=x.device)
        s_mid = None
        for t in moe.routed_tokens(mod, *routed):
            ce = t.count[:, None].float()
            s_in[t.expert] = (ce * t.x.float().pow(2)).sum(0)
            if want_mid:
                if s_mid is None:
                    s_mid = torch.zeros(
                        mod.num_experts, t.mid.shape[-1], dtype=torch.float32, device=x.device
                    )
                s_mid[t.expert] = (ce * t.mid.float().pow(2)).sum(0)
        _accumulate(sums, (key, "in"), s_in)
        if s_mid is not None:
            _accumulate(sums, (key, "mid"), s_mid)

    return hook


def _wanda(name: str, p: torch.Tensor, plan: tuple[str, str], sums: Sums, model) -> torch.Tensor:
    mod_name, part = plan
    w = p.detach().abs().float()
    if (mod_name, part) not in sums:
        log.warning("esa: act_mag saw no input reaching %s; its scores are 0", name)
        return w.zero_()
    norm = sums[(mod_name, part)].sqrt().to(w.device)
    if part == "linear":
        return w.mul_(norm[None, :])
    transposed = moe.is_transposed(model.get_submodule(mod_name))
    if norm.shape[1] != w.shape[1 if transposed else 2]:
        raise ConfigError(
            f"act_mag: unexpected layout of {name} {tuple(p.shape)}: "
            "drop it from names= or use another metric"
        )
    return w.mul_(norm[:, :, None] if transposed else norm[:, None, :])
