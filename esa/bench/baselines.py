"""The plain-transformers references esa is timed against: what a user without esa would write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from esa.models import LoadedModel


def plain_eval(model: Any, windows: torch.Tensor, batch_size: int, labels: bool = True) -> float:
    """Mean loss with plain transformers: ``model(input_ids, labels=input_ids)`` per batch (full
    logits, transformers' own upcast loss), bf16 and the model's attention kernel (sdpa).
    With ``labels=False`` a logits-only forward; the returned number is then only a checksum."""
    device = model.get_input_embeddings().weight.device
    ids = windows.to(device)
    total = None
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size]
            out = model(input_ids=b, labels=b if labels else None, use_cache=False)
            val = out.loss.float() * b.shape[0] if labels else out.logits[:, -1, 0].float().sum()
            total = val if total is None else total + val
    assert total is not None, "no windows"
    return float(total) / ids.shape[0]


def plain_grad_x_weight(
    lm: LoadedModel, calib: torch.Tensor, batch_size: int, names: Sequence[str], keep: bool = False
) -> dict[str, torch.Tensor] | None:
    """grad_x_weight the plain way: ``loss.backward()`` per batch into ``.grad`` (bf16), no
    checkpointing, then |w * grad| in fp32 per tensor (returned when ``keep``). Leaves ``.grad``
    and ``requires_grad`` as they were."""
    model: Any = lm.model
    named = dict(model.named_parameters())
    wanted = set(names)
    flags = {n: p.requires_grad for n, p in named.items()}
    device = model.get_input_embeddings().weight.device
    ids = calib.to(device)
    try:
        for n, p in named.items():
            p.requires_grad_(n in wanted)
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size]
            loss = model(input_ids=b, labels=b, use_cache=False).loss * (b.shape[0] / ids.shape[0])
            loss.backward()
        scores = {
            n: (named[n].detach().float() * named[n].grad.float()).abs()
            for n in names
            if named[n].grad is not None
        }
        return scores if keep else None
    finally:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(flags[n])
