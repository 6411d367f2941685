"""Progressive perturbation: grow the perturbed set until a damage target is reached, and count
how many critical and how many random weights that takes.

Orders over the scored tensors (``esa.analyses.bitflip``): ``critical`` = the global ranking by
the metric, highest first (``ranked_order``); ``random`` = a seeded uniform shuffle of the same
population (``random_order``: every prefix is a uniform sample). For n = 1, 2, 4, ... (doubling,
then ``max_weights`` itself) the registered perturbation ``method`` (``esa.perturb``; scale /
probability default as in ``resolve_scale`` / ``resolve_prob``) is applied to the first n
entries of an order (nested sets), perplexity is measured on the evaluation windows, and the
weights are restored bit-exactly (verified) before the next n. The damage target is
PPL ≥ factor × PPL_baseline, or a non-finite PPL (``bitflip.is_failure``). A curve stops at the
first n that reaches it: ``weights_needed`` = that n, resolved to the grid (the true count lies in
(previous n, n]); None when ``max_weights`` did not reach it.

``critical_vs_random`` compares the two (``bitflip.critical_vs_random``): ratio = random / critical
when both reached the target ("exact" on the grid); > max_weights / critical ("lower") when random
never did; "undefined" when critical never did.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from esa.analyses.bitflip import (
    _windows,
    critical_vs_random,
    is_failure,
    plot_flip_curves,
    random_order,
    ranked_order,
)
from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.perturb import perturbed, resolve_prob, resolve_scale

log = logging.getLogger("esa")

KINDS = ("critical", "random")
DEFAULT_FACTOR = 2.0  # damage target: perplexity doubled
DEFAULT_MAX_WEIGHTS = 4096


def doubling(max_weights: int) -> list[int]:
    """1, 2, 4, ... below ``max_weights``, then ``max_weights`` itself."""
    if isinstance(max_weights, bool) or not isinstance(max_weights, int) or max_weights < 1:
        raise ConfigError(f"max_weights must be a positive integer, got {max_weights!r}; pass e.g. 4096")
    counts = [2**i for i in range(max_weights.bit_length()) if 2**i < max_weights]
    return [*counts, max_weights]


def progressive_curve(
    lm,
    windows: torch.Tensor,
    order: Sequence[tuple[str, int]],
    counts: Sequence[int],
    method: str,
    target_ppl: float,
    *,
    scale: float | None = None,
    prob: float = 1.0,
    bit: int | str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    label: str = "",
    progress: bool = True,
) -> list[dict]:
    """PPL with ``method`` applied to the first n entries of ``order`` for each n of ``counts``
    (ascending), stopping after the first n that reaches ``target_ppl``.

    One plain dict per n: n_weights, ppl, nll, finite, reached, n_changed, label, seed."""
    params = dict(lm.model.named_parameters())
    curve = []
    for n in tqdm(counts, desc=f"progressive {label}".strip(), disable=not progress, leave=False):
        indices: dict[str, list[int]] = {}
        for name, flat in order[:n]:
            indices.setdefault(name, []).append(flat)
        sel = {name: torch.tensor(v, dtype=torch.long) for name, v in indices.items()}
        with perturbed(params, sel, method, scale=scale, prob=prob, bit=bit, seed=seed) as info:
            result = evaluate(lm.model, windows, batch_size=batch_size, progress=False)
        reached = is_failure(result.ppl, target_ppl)
        curve.append(
            {
                "n_weights": int(n),
                "ppl": float(result.ppl),
                "nll": float(result.nll),
                "finite": bool(result.finite),
                "reached": reached,
                "n_changed": int(info.n_changed),
                "label": label,
                "seed": int(seed),
            }
        )
        log.info("esa: %s %s on %d weights: ppl %.4g", label, method, n, result.ppl)
        if reached:
            break
    return curve


def weights_needed(curve: Sequence[Mapping]) -> int | None:
    """The first ``n_weights`` of ``curve`` that reached the target (None if none did)."""
    return next((int(p["n_weights"]) for p in curve if p["reached"]), None)


def _as_flips(curve: Sequence[Mapping]) -> list[dict]:
    return [{"n_flips": p["n_weights"], "ppl": p["ppl"]} for p in curve]


def progressive(
    lm,
    data,
    scores: Mapping[str, torch.Tensor],
    method: str = "zero",
    *,
    factor: float = DEFAULT_FACTOR,
    max_weights: int = DEFAULT_MAX_WEIGHTS,
    scale: float | None = None,
    prob: float | None = None,
    bit: int | str | None = None,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    batch_size: int = 8,
    metric: str = "",
    progress: bool = True,
) -> dict:
    """How many critical vs random weights ``method`` needs to reach PPL ≥ ``factor`` x baseline
    (module doc). ``data`` is a DataBundle or evaluation windows ``[n, L]``; ``scores`` rank the
    critical order (and fix the population the random one is drawn from); ``max_weights`` is
    capped at the number of scored entries.

    Returns plain values: method, scale, prob, bit, factor, baseline_ppl, target_ppl, max_weights,
    counts, curves (kind -> points), weights_needed (kind -> n or None), critical_vs_random (when
    both kinds ran: critical, random, ratio, bound, text)."""
    windows = _windows(data)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ConfigError(f"the damage factor must be a number > 1, got {factor!r}; pass e.g. factor=2")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"unknown progressive kind(s) {bad or kinds}: use critical and/or random")
    scale, prob = resolve_scale(method, scale), resolve_prob(method, prob)
    total = sum(int(s.numel()) for s in scores.values())
    counts = doubling(min(max_weights, total) if total else max_weights)
    baseline = evaluate(lm.model, windows, batch_size=batch_size, progress=False).ppl
    if not math.isfinite(baseline) or baseline <= 0:
        raise ConfigError(
            f"baseline perplexity {baseline} is not finite and positive: check the model and data"
        )
    target = factor * baseline
    curves = {}
    for kind in kinds:
        if kind == "critical":
            order = ranked_order(scores, counts[-1], kind="top", metric=metric)
        else:
            order = random_order(scores, counts[-1], seed=seed)
        curves[kind] = progressive_curve(
            lm, windows, order, counts, method, target, scale=scale, prob=prob, bit=bit, seed=seed,
            batch_size=batch_size, label=kind, progress=progress,
        )  # fmt: skip
    out = {
        "method": method,
        "scale": scale,
        "prob": float(prob),
        "bit": bit,
        "factor": float(factor),
        "baseline_ppl": float(baseline),
        "target_ppl": float(target),
        "max_weights": counts[-1],
        "counts": counts,
        "curves": curves,
        "weights_needed": {k: weights_needed(c) for k, c in curves.items()},
    }
    if "critical" in curves and "random" in curves:
        cmp = critical_vs_random(_as_flips(curves["critical"]), _as_flips(curves["random"]), target)
        cmp["critical"], cmp["critical_max"] = cmp.pop("top"), cmp.pop("top_max")
        cmp["text"] = cmp["text"].replace("top", "critical").replace("flips", "weights")
        out["critical_vs_random"] = cmp
    return out


def plot_progressive(result: Mapping, title: str | None = None):
    """PPL against the number of perturbed weights per kind (log-log), with the baseline and the
    damage target (``bitflip.plot_flip_curves``)."""
    fig = plot_flip_curves(
        {k: _as_flips(c) for k, c in result["curves"].items()},
        baseline_ppl=result["baseline_ppl"],
        failure_ppl=result["target_ppl"],
        title=title or f"progressive {result['method']}: weights to {result['factor']:g}x perplexity",
    )
    fig.axes[0].set_xlabel("perturbed weights")
    return fig
