"""Replay of transformers' fused MoE experts modules (Mixtral-style ``mlp.experts``).

A fused experts module holds every expert in 3-D tensors (``gate_up_proj`` or ``up_proj``, and
``down_proj``, ``[experts, out, in]`` or transposed ``[experts, in, out]``) and is called as
``experts(hidden_states, top_k_index, top_k_weights)``. From one call's inputs,
:func:`routed_tokens` gives per expert e the tokens routed to it and recomputes, independently of
the experts kernel transformers dispatches to,

    mid_e = act(x_e W_gate,eᵀ) ⊙ (x_e W_up,eᵀ)   (or act(x_e W_up,eᵀ) without a gate),
    out_e = mid_e W_down,eᵀ  (+ biases where the module has them),

``mid_e`` being the input of ``down_proj[e]`` and ``out_e`` its (unweighted) output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(mod: Any) -> bool:
    """A transformers experts module holding all experts in 3-D tensors."""
    return hasattr(mod, "num_experts")


def is_transposed(mod: Any) -> bool:
    """Whether the expert tensors are stored ``[experts, in, out]`` (else ``[experts, out, in]``)."""
    return bool(getattr(mod, "is_transposed", False))


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(hidden [T, d], top_k_index [T, k])`` of one experts call (a forward hook's args/kwargs),
    tokens flattened; None when the call does not pass ``top_k_index``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    if index is None:
        return None
    x = hidden.detach().reshape(-1, hidden.shape[-1])
    return x, index.reshape(x.shape[0], -1)


@dataclass
class RoutedTokens:
    """The tokens one experts call routed to ``expert``: flat positions ``rows``, ``count`` (how
    often each was routed there: 1 unless top_k repeats an expert) and their inputs ``x``."""

    module: Any
    expert: int
    rows: torch.Tensor
    count: torch.Tensor
    x: torch.Tensor

    @cached_property
    def mid(self) -> torch.Tensor:
        """The gated activation: the input of ``down_proj[expert]``."""
        return expert_mid(self.module, self.expert, self.x)

    @cached_property
    def out(self) -> torch.Tensor:
        """The output of ``down_proj[expert]`` (before the routing weight)."""
        return expert_out(self.module, self.expert, self.mid)


def routed_tokens(mod: Any, x: torch.Tensor, index: torch.Tensor) -> Iterator[RoutedTokens]:
    """Per expert (in order) with at least one token: its :class:`RoutedTokens` (see :func:`routing`)."""
    for e in range(mod.num_experts):
        count = (index == e).sum(-1)
        rows = count.nonzero().squeeze(-1)
        if rows.numel():
            yield RoutedTokens(mod, e, rows, count[rows], x[rows])


def _project(mod: Any, inp: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = w.to(inp.dtype)
    res = inp @ w if is_transposed(mod) else torch.nn.functional.linear(inp, w)
    return res + bias if getattr(mod, "has_bias", False) and bias is not None else res


def expert_mid(mod: Any, e: int, xe: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s gated activation (its ``down_proj`` input) for tokens ``xe``."""
    has_gate = getattr(mod, "has_gate", hasattr(mod, "gate_up_proj"))
    first = mod.gate_up_proj if has_gate else mod.up_proj
    bias = getattr(mod, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
    h = _project(mod, xe, first[e], None if bias is None else bias[e])
    return mod._apply_gate(h) if has_gate else mod.act_fn(h)


def expert_out(mod: Any, e: int, mid: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s ``down_proj`` output for its gated activation ``mid``."""
    bias = getattr(mod, "down_proj_bias", None)
    return _project(mod, mid, mod.down_proj[e], None if bias is None else bias[e])
