"""Advanced perturbations (the old runner's ``--advanced-perturbations``): adaptive noise,
magnitude scaling and quantization of the selected weights.

``esa.perturb`` registers them at import (``register_extra``), so they get the same verified
bit-exact restore as the built-in methods, ``esa metrics`` lists them and the contract tests in
``tests/test_perturb.py`` cover them. Their result depends on the weight's neighbourhood, so each
function also receives the whole tensor (``weights``, read only, unperturbed) and the selected flat
indices (``index``). Rows are the rows of ``W.reshape(-1, W.shape[-1])`` (the output channels of a
``[out, in]`` matrix; per expert for ``[E, out, in]``); a 1-D tensor is one row. Arithmetic is
float32 (float64 for float64 weights), cast back to the weight dtype.

- ``adaptive_noise``: w' = w + s · rms_r · ε, ε ~ N(0, 1) (seeded), rms_r = sqrt(mean_j W[r, j]²) the
  RMS of the weight's row; s = scale > 0 (default 0.02). Unlike ``gauss_noise`` (σ = s·|w|), σ is
  the row's local scale: a small weight among large ones gets large noise, an outlier (a super
  weight) noise on its neighbours' scale. Changes every entry of a row with rms ≠ 0.
- ``magnitude_scaling``: w' = s · w with s > 0 (default 2.0; ``--scale``): |w| scaled, sign kept.
  The ``scale`` method's function under a positive factor. Changes w ≠ 0 (none at s = 1).
- ``quantization``: w' = clamp(round(w / Δ), −L, L) · Δ with L = 2^(b−1) − 1 and Δ = max|W| / L
  (symmetric absmax grid of the whole tensor); ``quantization_per_row``: Δ_r = max_j |W[r, j]| / L.
  b = scale = the bit count (``--bits``; an integer 2..16, default 4). Only the selected weights
  are rounded, on the grid of the unperturbed tensor (row). Changes the entries not already on
  the grid; a tensor (row) whose max is 0 or not finite is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping

import torch

from esa.errors import ConfigError
from esa.util.bits import bits_view

MAX_BITS = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` as ``[rows, cols]``: ``reshape(-1, shape[-1])``; a 0-D / 1-D tensor is one row."""
    return weights.reshape(-1, weights.shape[-1]) if weights.ndim >= 2 else weights.reshape(1, -1)


def row_of(index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The row (of ``as_rows``) of each flat index: ``index // cols``."""
    cols = weights.shape[-1] if weights.ndim >= 2 else max(weights.numel(), 1)
    return torch.div(index, cols, rounding_mode="floor")


def row_rms(rows: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """sqrt(mean_j x[r, j]²) per row of a ``[rows, cols]`` tensor, in ``compute``."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=compute) / math.sqrt(max(rows.shape[1], 1))


def quant_levels(bits) -> int:
    """L = 2^(b−1) − 1 for an integer bit count b in 2..16 (ConfigError naming the fix otherwise)."""
    ok = isinstance(bits, (int, float)) and not isinstance(bits, bool) and math.isfinite(bits)
    if not ok or bits != int(bits) or not 2 <= int(bits) <= MAX_BITS:
        raise ConfigError(
            f"quantization needs an integer bit count from 2 to {MAX_BITS} (--bits, passed as scale), "
            f"got {bits!r}; pass e.g. --bits 4"
        )
    return 2 ** (int(bits) - 1) - 1


def quantize(x: torch.Tensor, absmax: torch.Tensor, levels: int) -> torch.Tensor:
    """clamp(round(x / Δ), −L, L) · Δ with Δ = absmax / L (broadcast); x where Δ is 0 or not finite."""
    step = absmax / levels
    ok = torch.isfinite(step) & (step > 0)
    safe = torch.where(ok, step, torch.ones_like(step))
    return torch.where(ok, torch.clamp(torch.round(x / safe), -levels, levels) * safe, x)


def _adaptive_noise(values, *, scale, generator, weights, index, **_):
    compute = compute_dtype(values.dtype)
    rows, where = torch.unique(row_of(index, weights), return_inverse=True)
    rms = row_rms(as_rows(weights)[rows], compute)[where]
    noise = torch.randn(values.numel(), generator=generator, dtype=compute).to(values.device)
    return (values.to(compute) + scale * rms * noise).to(values.dtype)


def _adaptive_changes(w: torch.Tensor, scale: float | None) -> torch.Tensor:
    rows = as_rows(w)
    live = (row_rms(rows, compute_dtype(w.dtype)) != 0) & (scale != 0)
    return live[:, None].expand(rows.shape).reshape(w.shape)


def _absmax(rows: torch.Tensor, per_row: bool, compute: torch.dtype) -> torch.Tensor:
    """max |x| per row (``[rows, 1]``) or over the whole tensor (0-D), in ``compute``."""
    if rows.numel() == 0:
        return torch.zeros((), dtype=compute, device=rows.device)
    if per_row:
        return rows.abs().amax(dim=1, keepdim=True).to(compute)
    return rows.abs().max().to(compute)


def _quantization(per_row: bool) -> tuple[Callable, Callable]:
    """(perturbation fn, changes mask) of the per-tensor or per-row symmetric grid."""

    def fn(values, *, scale, weights, index, **_):
        levels, compute = quant_levels(scale), compute_dtype(values.dtype)
        if per_row:
            rows, where = torch.unique(row_of(index, weights), return_inverse=True)
            absmax = _absmax(as_rows(weights)[rows], True, compute)[where, 0]
        else:
            absmax = _absmax(as_rows(weights), False, compute)
        return quantize(values.to(compute), absmax, levels).to(values.dtype)

    def changes(w: torch.Tensor, scale: float | None) -> torch.Tensor:
        levels, compute = quant_levels(scale), compute_dtype(w.dtype)
        rows = as_rows(w)
        q = quantize(rows.to(compute), _absmax(rows, per_row, compute), levels).to(w.dtype)
        return (bits_view(q.contiguous()) != bits_view(rows.contiguous())).reshape(w.shape)

    return fn, changes


def register_extra(register: Callable[..., Callable], registry: MutableMapping) -> None:
    """Register adaptive_noise, magnitude_scaling, quantization and quantization_per_row with
    ``register`` (``esa.perturb.register_perturbation``); ``registry`` must already hold ``scale``."""
    register(
        "adaptive_noise",
        needs_scale=True,
        positive_scale=True,
        default_scale=0.02,
        random=True,
        changes=_adaptive_changes,
    )(_adaptive_noise)
    base = registry["scale"]
    register(
        "magnitude_scaling", needs_scale=True, positive_scale=True, default_scale=2.0, changes=base.changes
    )(base.fn)
    for name, per_row in (("quantization", False), ("quantization_per_row", True)):
        fn, changes = _quantization(per_row)
        register(name, needs_scale=True, default_scale=4.0, changes=changes)(fn)
