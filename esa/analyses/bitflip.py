"""Flips-to-failure: how many single-bit flips in which weights break a model.

A *candidate order* is a list of ``(tensor name, flat index)`` entries, most interesting first:
``ranked_order`` (top- or bottom-ranked by a metric, one global ranking over all scored tensors)
or ``random_order`` (a seeded uniform shuffle over the same population). ``flip_curve`` flips
one bit in the first ``n`` entries for each ``n`` in ``counts`` (nested sets), evaluates
perplexity on the evaluation windows and restores the weights bit-exactly
(``esa.perturb.perturbed(..., "bit_flip")``, verified) before the next ``n``.

Bit positions (``bit_position``; bit 0 = least significant bit of the integer view):

=================  =====  =====  =====  ======================================================
position           fp32   bf16   fp16   meaning
=================  =====  =====  =====  ======================================================
``sign``             31     15     15   the sign bit (MSB of the format)
``exponent_msb``     30     14     14   exponent MSB (``esa.perturb.default_bit``); |w| < 1
                                        becomes |w| x 2^128 (fp32, bf16) / x 2^16 (fp16),
                                        1 <= |w| < 2 becomes inf/NaN, |w| >= 2 is divided
                                        by 2^128 (fp32, bf16) / 2^16 (fp16)
``mantissa``         22      6      9   the TOP mantissa bit (largest relative change a
                                        mantissa flip can make: x 1.5 or x 2/3 or so)
``mantissa_lsb``      0      0      0   the lowest mantissa bit (one ulp)
=================  =====  =====  =====  ======================================================

Failure (``flips_to_failure``): a curve point *fails* when its perplexity is non-finite (NaN or
inf) or ``>= failure_ppl``; ``failure_threshold(baseline, factor=10)`` gives the default
threshold, 10 x the unperturbed perplexity. Flips-to-failure is the smallest measured count that
fails. With counts 1, 2, 4, ... it is resolved only to the grid: the true first failing count
lies in (previous count, reported count]. A curve that never fails returns None: the only claim
it supports is "more than the largest count tried" (``critical_vs_random`` reports that as a
bound, not a number).

To compare formats load the model in each dtype (``esa.models.load_model(name, dtype=...)``);
this module never copies or converts a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.perturb import bit_position, perturbed
from esa.select import select

log = logging.getLogger("esa")

DEFAULT_COUNTS = tuple(2**i for i in range(11))  # 1, 2, 4, ..., 1024
FAILURE_FACTOR = 10.0
_COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#0a7f86"]


# --- candidate orders -------------------------------------------------------------------------


def _dedupe(order) -> list[tuple[str, int]]:
    return list(dict.fromkeys((str(n), int(i)) for n, i in order))


def ranked_order(
    scores: Mapping[str, torch.Tensor], k: int, kind: str = "top", metric: str = ""
) -> list[tuple[str, int]]:
    """The ``k`` highest (``top``) or lowest (``bottom``) scored entries over all tensors, most
    extreme first (ties: tensor order, then ascending index; NaN last), as (name, flat index)."""
    if kind not in ("top", "bottom"):
        raise ConfigError(
            f"ranked_order kind must be 'top' or 'bottom', got {kind!r}; use random_order for random"
        )
    frame = select(scores, k, kind=kind, mode="global", metric=metric).to_frame()
    return list(zip(frame["tensor"].astype(str).tolist(), frame["flat_index"].astype(int).tolist()))


def random_order(scores: Mapping[str, torch.Tensor], k: int, seed: int = 0) -> list[tuple[str, int]]:
    """``k`` entries drawn uniformly without replacement from all tensors of ``scores`` (only
    their shapes matter), in a seeded random order, so every prefix is a uniform sample."""
    sel = select(scores, k, kind="random", mode="global", seed=seed)
    pairs = [(n, int(i)) for n, idx in sel.indices.items() for i in idx.tolist()]
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    perm = torch.randperm(len(pairs), generator=gen).tolist()
    return [pairs[p] for p in perm]


# --- curves ------------------------------------------------------------------------------------


def _windows(data) -> torch.Tensor:
    windows = getattr(data, "eval_ids", data)
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        raise ConfigError("data must be a DataBundle or a LongTensor [n, L] of evaluation windows")
    return windows


def _check_counts(counts) -> list[int]:
    out = []
    for c in counts:
        if isinstance(c, bool) or not hasattr(c, "__index__") or int(c) < 1:
            raise ConfigError(f"flip counts must be positive integers, got {c!r}")
        out.append(int(c))
    if not out:
        raise ConfigError("no flip counts given; pass e.g. counts=(1, 2, 4, 8)")
    return sorted(set(out))


def flip_curve(
    lm,
    data,
    selection_order: Sequence[tuple[str, int]],
    counts: Sequence[int] = DEFAULT_COUNTS,
    bit: int | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    *,
    failure_ppl: float | None = None,
    batch_size: int = 8,
    label: str = "",
    progress: bool = True,
) -> list[dict]:
    """Perplexity after flipping ``bit`` in the first ``n`` entries of ``selection_order``, per n.

    ``bit`` is an int or a position name (module table; default ``exponent_msb``), resolved
    for the model's dtype. ``dtype``, when given, must be the dtype of the flipped weights
    (load the model in that dtype; nothing is converted here). ``seed`` is recorded (orders
    carry their own randomness). With ``failure_ppl`` the sweep stops after the first failing
    count (non-finite or >= failure_ppl). Duplicate entries in the order are dropped.

    Returns one plain dict per count: n_flips, ppl, nll, finite, failed (None without
    ``failure_ppl``), n_changed (entries whose bits changed), bit, dtype, label, seed.
    """
    windows = _windows(data)
    order = _dedupe(selection_order)
    counts = _check_counts(counts)
    if counts[-1] > len(order):
        raise ConfigError(
            f"largest count {counts[-1]} exceeds the {len(order)} distinct candidates; "
            "build a longer order or lower the counts"
        )
    params = dict(lm.model.named_parameters())
    dtypes = set()
    for name, _ in order[: counts[-1]]:
        if name not in params:
            raise ConfigError(f"candidate tensor {name!r} is not a parameter of the model")
        dtypes.add(params[name].dtype)
    if len(dtypes) != 1:
        raise ConfigError(f"the candidates span dtypes {sorted(map(str, dtypes))}; flip one format at a time")
    param_dtype = dtypes.pop()
    if dtype is not None and dtype != param_dtype:
        raise ConfigError(
            f"dtype={dtype} but the weights are {param_dtype}: load the model with "
            f"load_model(name, dtype=...) in the format to test"
        )
    used_bit = bit_position(bit, param_dtype)
    curve = []
    for n in tqdm(counts, desc=f"flips {label}".strip(), disable=not progress, leave=False):
        indices: dict[str, list[int]] = {}
        for name, flat in order[:n]:
            indices.setdefault(name, []).append(flat)
        sel = {name: torch.tensor(v, dtype=torch.long) for name, v in indices.items()}
        with perturbed(params, sel, "bit_flip", bit=used_bit) as info:
            result = evaluate(lm.model, windows, batch_size=batch_size, progress=False)
        failed = None if failure_ppl is None else is_failure(result.ppl, failure_ppl)
        curve.append(
            {
                "n_flips": n,
                "ppl": result.ppl,
                "nll": result.nll,
                "finite": result.finite,
                "failed": failed,
                "n_changed": info.n_changed,
                "bit": used_bit,
                "dtype": str(param_dtype).replace("torch.", ""),
                "label": label,
                "seed": int(seed),
            }
        )
        log.info("esa: %s %d flips of bit %d: ppl %.4g", label, n, used_bit, result.ppl)
        if failed:
            break
    return curve


def failure_threshold(baseline_ppl: float, factor: float = FAILURE_FACTOR) -> float:
    """The failure perplexity: ``factor`` x the unperturbed perplexity (default 10x)."""
    if not math.isfinite(baseline_ppl) or baseline_ppl <= 0:
        raise ConfigError(f"baseline perplexity {baseline_ppl} must be finite and positive")
    return factor * baseline_ppl


def is_failure(ppl: float, failure_ppl: float) -> bool:
    """True when ``ppl`` is NaN, inf, or >= ``failure_ppl``."""
    return not math.isfinite(ppl) or ppl >= failure_ppl


def flips_to_failure(curve: Sequence[Mapping], failure_ppl: float) -> int | None:
    """Smallest ``n_flips`` in ``curve`` whose perplexity fails (non-finite or >= failure_ppl);
    None when no measured point fails (i.e. more than ``max_count(curve)`` flips are needed,
    as far as the curve shows)."""
    failing = [int(p["n_flips"]) for p in curve if is_failure(float(p["ppl"]), failure_ppl)]
    return min(failing) if failing else None


def max_count(curve: Sequence[Mapping]) -> int:
    """The largest flip count measured in ``curve`` (0 for an empty curve)."""
    return max((int(p["n_flips"]) for p in curve), default=0)


def critical_vs_random(
    top_curve: Sequence[Mapping], random_curve: Sequence[Mapping], failure_ppl: float
) -> dict:
    """How many times fewer flips the top-ranked weights need to fail the model than random ones.

    Returns plain values: ``top`` / ``random`` (flips-to-failure or None), ``top_max`` /
    ``random_max`` (largest counts tried), ``ratio`` and ``bound``:

    - both fail: ratio = random / top, bound "exact" (on the count grid);
    - only top fails: random needs more than ``random_max`` flips, so ratio > random_max / top;
      ``ratio`` is that value and bound "lower";
    - top never fails: ratio None, bound "undefined" (nothing can be said about the ratio).

    ``text`` renders it (e.g. "> 1024", "= 8", "undefined (top never failed within 1024)").
    """
    top, rnd = flips_to_failure(top_curve, failure_ppl), flips_to_failure(random_curve, failure_ppl)
    top_max, rnd_max = max_count(top_curve), max_count(random_curve)
    if top is None:
        ratio, bound, text = None, "undefined", f"undefined (top never failed within {top_max} flips)"
    elif rnd is None:
        ratio, bound = rnd_max / top, "lower"
        text = f"> {ratio:g} (random never failed within {rnd_max} flips)"
    else:
        ratio, bound = rnd / top, "exact"
        text = f"= {ratio:g}"
    return {
        "top": top,
        "random": rnd,
        "top_max": top_max,
        "random_max": rnd_max,
        "ratio": ratio,
        "bound": bound,
        "text": text,
        "failure_ppl": float(failure_ppl),
    }


def flip_comparison(
    lm,
    data,
    scores: Mapping[str, torch.Tensor],
    counts: Sequence[int] = DEFAULT_COUNTS,
    bit: int | str | None = None,
    seed: int = 0,
    *,
    failure_factor: float = FAILURE_FACTOR,
    stop_at_failure: bool = True,
    kinds: Sequence[str] = ("top", "random", "bottom"),
    batch_size: int = 8,
    metric: str = "",
    progress: bool = True,
) -> dict:
    """Curves for top-ranked, random and bottom-ranked candidates (global ranking of ``scores``).

    Returns baseline_ppl, failure_ppl (``failure_factor`` x baseline), ``curves`` (kind -> curve),
    ``flips_to_failure`` (kind -> int or None) and ``critical_vs_random`` (when top and random
    were run).
    """
    windows = _windows(data)
    counts = _check_counts(counts)
    baseline = evaluate(lm.model, windows, batch_size=batch_size, progress=False).ppl
    failure_ppl = failure_threshold(baseline, failure_factor)
    curves = {}
    for kind in kinds:
        if kind == "random":
            order = random_order(scores, counts[-1], seed=seed)
        else:
            order = ranked_order(scores, counts[-1], kind=kind, metric=metric)
        curves[kind] = flip_curve(
            lm,
            windows,
            order,
            counts,
            bit=bit,
            seed=seed,
            failure_ppl=failure_ppl if stop_at_failure else None,
            batch_size=batch_size,
            label=kind,
            progress=progress,
        )
    out = {
        "baseline_ppl": baseline,
        "failure_ppl": failure_ppl,
        "failure_factor": float(failure_factor),
        "curves": curves,
        "flips_to_failure": {k: flips_to_failure(c, failure_ppl) for k, c in curves.items()},
        "max_count": counts[-1],
    }
    if "top" in curves and "random" in curves:
        out["critical_vs_random"] = critical_vs_random(curves["top"], curves["random"], failure_ppl)
    return out


def plot_flip_curves(
    curves: Mapping[str, Sequence[Mapping]],
    *,
    baseline_ppl: float | None = None,
    failure_ppl: float | None = None,
    title: str = "flips to failure",
):
    """PPL vs number of flipped weights, one line per label (log x, log y).

    Non-finite perplexities cannot sit on a log axis: they are drawn as an ``x`` at the top edge
    and counted in the legend. Optional dashed lines mark the baseline and the failure threshold.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite_vals = [float(p["ppl"]) for c in curves.values() for p in c if math.isfinite(float(p["ppl"]))]
    finite_vals += [v for v in (baseline_ppl, failure_ppl) if v is not None and math.isfinite(v)]
    top = max(finite_vals) * 10 if finite_vals else 10.0
    for i, (label, curve) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        x = np.array([float(p["n_flips"]) for p in curve])
        y = np.array([float(p["ppl"]) for p in curve])
        ok = np.isfinite(y)
        bad = int((~ok).sum())
        name = f"{label}" + (f" ({bad} non-finite, x)" if bad else "")
        ax.plot(x[ok], y[ok], marker="o", ms=4, lw=1.5, color=color, label=name)
        if bad:
            ax.scatter(x[~ok], np.full(bad, top), marker="x", s=40, color=color, clip_on=False)
    if baseline_ppl is not None:
        ax.axhline(baseline_ppl, color="#57606a", ls=":", lw=1, label=f"baseline {baseline_ppl:.3g}")
    if failure_ppl is not None:
        ax.axhline(failure_ppl, color="#cf222e", ls="--", lw=1, label=f"failure {failure_ppl:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("flipped weights")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    if curves or baseline_ppl is not None or failure_ppl is not None:
        ax.legend(fontsize=9)
    return fig
