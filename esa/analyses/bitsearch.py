"""Bit flips in the dtype a model is deployed in: vulnerability per bit position, and a progressive
sensitivity-guided bit search (BFA-style, Rakin et al. 2019) against random flips.

A flip of bit b of a weight XORs its same-width integer view with ``1 << b`` (``esa.perturb``'s
``bit_flip``, restored bit-exactly and verified on exit). Failure: PPL >= ``failure_ppl`` (e.g. 10x
the baseline) or non-finite (``esa.analyses.bitflip.is_failure``).

- ``position_vulnerability``: per bit position b, flip b in ``n`` random weights of the scored tensors
  (the same weights for every b; optionally also in the top-``n`` of a score map), one evaluation per
  position: PPL, ΔPPL and whether the model failed.
- ``guided_search``: progressive search. Step t computes the gradient g of the mean calibration NLL
  at the current (already flipped) weights, takes the ``per_tensor`` entries of largest |w·g| of
  every scored tensor (grad_x_weight at the current weights: every bit flip changes w by c_b(w)·w,
  so its first-order loss change g·Δw is ∝ g·w), and flips the (entry, bit) of largest first-order
  loss increase g·(flip_b(w) − w) among the allowed bits (finite results only, each entry at most
  once), then evaluates. It stops at the first failure or after ``max_flips``.
- ``random_search``: ``max_flips`` uniform random (entry, bit) pairs over the scored entries and the
  allowed bits, evaluated on the nested prefixes 1, 2, 4, ... until the first failure.

``bits_except(dtype, excluded)`` lists the allowed bit indices (e.g. all but the exponent MSB,
whose single flip fails a bf16 model for any weight with |w| < 2: it measures the format, not
sensitivity).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from esa import plots
from esa.analyses.bitflip import is_failure
from esa.errors import ConfigError
from esa.evaluate import evaluate, lm_loss
from esa.metrics.registry import grad_scope
from esa.perturb import bit_position, perturbed
from esa.select import select
from esa.util.bits import bit_width, bits_view

__all__ = [
    "bits_except",
    "flipped_values",
    "guided_search",
    "plot_positions",
    "position_vulnerability",
    "random_search",
]

Flip = tuple[str, int, int]  # (tensor name, flat index, bit)


def bits_except(dtype: torch.dtype, excluded: Sequence[str | int] = ()) -> list[int]:
    """Bit indices of ``dtype`` (0 = least significant) without the ``excluded`` positions."""
    drop = {bit_position(p, dtype) for p in excluded}
    return [b for b in range(bit_width(dtype)) if b not in drop]


def flipped_values(w: torch.Tensor, bit: int) -> torch.Tensor:
    """``w`` with ``bit`` flipped in every entry (a new tensor, same dtype)."""
    out = w.detach().clone()
    view = bits_view(out)
    mask = torch.tensor(1 << bit, dtype=torch.int64).to(view.dtype)  # wraps to the sign bit in int16
    view.bitwise_xor_(mask)
    return out


@contextlib.contextmanager
def _flipped(params: dict, flips: Sequence[Flip]):
    """All ``flips`` applied (grouped by bit; a pair listed twice flips once), restored on exit."""
    by_bit: dict[int, dict[str, set[int]]] = {}
    for name, flat, bit in flips:
        by_bit.setdefault(int(bit), {}).setdefault(name, set()).add(int(flat))
    with contextlib.ExitStack() as stack:
        for bit, entries in by_bit.items():
            sel = {n: torch.tensor(sorted(i), dtype=torch.long) for n, i in entries.items()}
            stack.enter_context(perturbed(params, sel, "bit_flip", bit=bit))
        yield


def _ppl(lm, data, batch_size: int) -> float:
    windows = getattr(data, "eval_ids", data)
    return float(evaluate(lm.model, windows, batch_size, progress=False).ppl)


def _params(lm, names: Sequence[str] | None) -> tuple[dict, list[str]]:
    params = dict(lm.model.named_parameters())
    names = list(names) if names is not None else lm.param_map.scorable()
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise ConfigError(f"no such scored tensor in {lm.name!r}: {missing[:1] or 'none given'}")
    return params, names


def position_vulnerability(
    lm,
    data,
    n: int,
    *,
    seed: int = 0,
    scores: dict | None = None,
    failure_ppl: float,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per bit position of the weights' dtype: bit, ppl_random (bit flipped in ``n`` random
    scored weights, drawn once with ``seed``), failed_random and, with ``scores``, ppl_top /
    failed_top (the ``n`` top-scored weights). Plain types."""
    params, names = _params(lm, names)
    dtype = params[names[0]].dtype
    shapes = {nm: params[nm].detach() for nm in names}
    kinds = {"random": select(shapes, n, "random", "global", seed=seed).indices}
    if scores is not None:
        kinds["top"] = select({nm: scores[nm] for nm in names}, n, "top", "global").indices
    rows = []
    for bit in tqdm(range(bit_width(dtype)), desc="bit positions", disable=not progress, leave=False):
        row: dict = {"bit": bit}
        for kind, sel in kinds.items():
            with perturbed(params, sel, "bit_flip", bit=bit):
                ppl = _ppl(lm, data, batch_size)
            row[f"ppl_{kind}"], row[f"failed_{kind}"] = ppl, is_failure(ppl, failure_ppl)
        rows.append(row)
    return rows


def _gradients(lm, calib: torch.Tensor, params: dict, names: list[str], batch_size: int) -> dict:
    """Gradient of the mean calibration NLL w.r.t. ``names`` at the current weights (as fp32)."""
    wanted = [params[n] for n in names]
    with grad_scope(lm.model, wanted):
        batches = range(0, calib.shape[0], batch_size)
        device = wanted[0].device
        for i in batches:
            loss = lm_loss(lm.model, calib[i : i + batch_size].to(device)) / len(batches)
            loss.backward()
        return {n: params[n].grad.detach().float().clone() for n in names}


def _best_flip(params: dict, grads: dict, bits: list[int], per_tensor: int, done: set) -> tuple[Flip, float]:
    """The (entry, bit) of largest first-order loss increase g·(flip(w) − w) among each tensor's
    ``per_tensor`` entries of largest |w·g| (entries in ``done`` excluded)."""
    best: tuple[Flip, float] = (("", -1, -1), -math.inf)
    for name, g in grads.items():
        w = params[name].detach().reshape(-1)
        sens = (w.float() * g.reshape(-1)).abs()
        for _, flat, _ in (f for f in done if f[0] == name):
            sens[flat] = -1.0  # each entry flipped at most once
        idx = torch.topk(sens, min(per_tensor, sens.numel())).indices
        cand, gc = w[idx], g.reshape(-1)[idx]
        for bit in bits:
            new = flipped_values(cand, bit).float()
            gain = torch.where(torch.isfinite(new), gc * (new - cand.float()), -math.inf)
            gain = torch.nan_to_num(gain, nan=-math.inf)
            j = int(gain.argmax())
            if float(gain[j]) > best[1]:
                best = ((name, int(idx[j]), bit), float(gain[j]))
    return best


def guided_search(
    lm,
    data,
    calib: torch.Tensor,
    *,
    bits: Sequence[int],
    max_flips: int,
    failure_ppl: float,
    per_tensor: int = 64,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """Progressive sensitivity-guided bit search (module doc). Returns plain types: flips [(tensor,
    flat, bit, estimated Δloss)], curve [{n_flips, ppl, failed}], flips_to_failure (int or None)."""
    params, names = _params(lm, names)
    if max_flips < 1 or not bits:
        raise ConfigError(f"max_flips must be >= 1 and bits non-empty, got {max_flips}, {list(bits)}")
    flips: list[Flip] = []
    curve, estimates = [], []
    with contextlib.ExitStack() as stack:
        for step in tqdm(range(int(max_flips)), desc="guided bit search", disable=not progress, leave=False):
            grads = _gradients(lm, calib, params, names, batch_size)
            flip, gain = _best_flip(params, grads, list(bits), per_tensor, set(flips))
            del grads
            if flip[1] < 0:
                break
            stack.enter_context(_flipped(params, [flip]))
            flips.append(flip)
            estimates.append(gain)
            ppl = _ppl(lm, data, batch_size)
            curve.append({"n_flips": step + 1, "ppl": ppl, "failed": is_failure(ppl, failure_ppl)})
            if curve[-1]["failed"]:
                break
    failed = [p["n_flips"] for p in curve if p["failed"]]
    return {
        "flips": [[n, i, b, e] for (n, i, b), e in zip(flips, estimates)],
        "curve": curve,
        "flips_to_failure": failed[0] if failed else None,
        "max_flips": int(max_flips),
    }


def random_search(
    lm,
    data,
    *,
    bits: Sequence[int],
    max_flips: int,
    failure_ppl: float,
    seed: int = 0,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """Random (entry, bit) flips on nested prefixes 1, 2, 4, ..., max_flips (module doc). Returns
    plain types: curve [{n_flips, ppl, failed}], flips_to_failure (the first failing count on that
    grid, or None), max_flips."""
    params, names = _params(lm, names)
    if max_flips < 1 or not bits:
        raise ConfigError(f"max_flips must be >= 1 and bits non-empty, got {max_flips}, {list(bits)}")
    sizes = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    which = torch.multinomial(sizes, max_flips, replacement=True, generator=gen).tolist()
    flats = [int(torch.randint(params[names[t]].numel(), (1,), generator=gen)) for t in which]
    picks = torch.randint(len(bits), (max_flips,), generator=gen).tolist()
    order = [(names[t], f, int(bits[b])) for t, f, b in zip(which, flats, picks)]
    counts = sorted({min(2**i, max_flips) for i in range(max_flips.bit_length() + 1)})
    curve = []
    for n in tqdm(counts, desc="random bit flips", disable=not progress, leave=False):
        with _flipped(params, order[:n]):
            ppl = _ppl(lm, data, batch_size)
        curve.append({"n_flips": n, "ppl": ppl, "failed": is_failure(ppl, failure_ppl)})
        if curve[-1]["failed"]:
            break
    failed = [p["n_flips"] for p in curve if p["failed"]]
    return {"curve": curve, "flips_to_failure": failed[0] if failed else None, "max_flips": int(max_flips)}


def plot_positions(rows: Sequence[dict], *, baseline_ppl: float, failure_ppl: float, title: str = ""):
    """PPL per flipped bit position (log y), one line per kind (random, top); non-finite PPL as an
    ``x`` at the top edge; dashed failure line, dotted baseline."""
    fig, ax = plots.figure(7.0, 4.0)
    kinds = [k for k in ("random", "top") if f"ppl_{k}" in rows[0]] if rows else []
    values = [r[f"ppl_{k}"] for r in rows for k in kinds]
    finite = [v for v in [*values, baseline_ppl, failure_ppl] if math.isfinite(v)]
    edge = max(finite) * 10 if finite else 10.0
    for color, kind in zip(("#0969da", "#cf222e"), kinds):
        x = np.array([r["bit"] for r in rows])
        y = np.array([r[f"ppl_{kind}"] for r in rows], dtype=float)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], marker="o", color=color, label=f"{kind} weights")
        if (~ok).any():
            ax.scatter(x[~ok], np.full(int((~ok).sum()), edge), marker="x", color=color, clip_on=False)
    ax.axhline(baseline_ppl, color="#57606a", ls=":", lw=1, label=f"baseline {baseline_ppl:.3g}")
    ax.axhline(failure_ppl, color="#cf222e", ls="--", lw=1, label=f"failure {failure_ppl:.3g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xlabel("flipped bit (0 = mantissa LSB; top = sign)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "PPL by flipped bit position")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
