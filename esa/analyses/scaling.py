"""Scaling analysis: how a sensitivity measure of a model changes with its parameter count.

For each model of a family one number is measured (``measure_model``), then a power law
``value = prefactor * n_params ** alpha`` is fitted in log-log space (``fit_scaling``) and drawn
(``plot_scaling``), both from ``esa.analyses.powerlaw`` and re-exported here. All measures rank weights by the ``grad_x_weight`` metric, ``|w ⊙ g|`` with g the
gradient of the mean next-token NLL over ``n_calib`` calibration windows
(``esa.metrics.compute_scores``), over the default scored tensors (``lm.param_map.scorable()``:
the weight matrices of the blocks; no embeddings, lm_head, norms or biases). PPL is the token
perplexity of ``data.eval_ids`` (``esa.evaluate.evaluate``); ΔPPL = PPL(perturbed) − PPL(baseline);
"zeroing" sets the selected entries to 0 inside ``esa.perturb.perturbed`` (restored bit-exactly).

Measures (``MEASURES``):

- ``concentration``: mean of the largest ``ceil(top_fraction · N)`` scores (``top_fraction`` =
  0.01, N = the number of scored entries) divided by the median of all N scores (numpy's median:
  the mean of the two middle order statistics when N is even). Both are exact order statistics,
  found by bisection on the float bit patterns (no concatenation of all scores).
- ``super_random_ratio``: ΔPPL(zero the top-k_t entries of every scored tensor t) divided by the
  mean ΔPPL over ``n_random`` (5) draws of zeroing k_t uniformly random entries of every tensor t,
  with k_t = max(1, round(fraction · numel(t))) (``fraction`` = 1e-2, so k grows with the model;
  at 1e-3 the random ΔPPL of the trained scaling family is indistinguishable from 0, often < 0).
  Random draw r uses seed ``seed + r`` (``esa.select.select(kind="random")``). When the random
  ΔPPL mean is <= 0 the ratio is +inf (random damage not measurable at this budget).
- ``weights_to_double``: the smallest k such that zeroing the global top-k entries (one ranking
  over all scored tensors) gives PPL >= ``factor`` · PPL(baseline) (``factor`` = 2; a non-finite
  PPL counts as reached). Search: k = 1, 2, 4, ... until reached (lo = the last k that was not),
  then integer bisection at geometric midpoints between lo and hi until hi − lo <= 1; returns
  hi. This is exact when PPL grows monotonically with k and a search result otherwise. +inf when
  zeroing every scored entry does not reach the factor.
- ``fraction_to_double``: ``weights_to_double`` / N (N = the number of scored entries), the same
  search as a share of the model. A count of weights grows with the model whenever sensitivity is
  diffuse, so a power law in the count is near-automatic; scaling claims fit the scale-free
  measures (``concentration``, ``super_random_ratio``, ``fraction_to_double``).

``QUANTITIES`` names each measure's quantity in words (for reports and plot axes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from esa.analyses.powerlaw import fit_scaling, plot_scaling
from esa.data import prepare_data
from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.metrics import compute_scores
from esa.models import load_model
from esa.perturb import perturbed
from esa.select import select
from esa.util.runtime import package_root

log = logging.getLogger("esa")

__all__ = [
    "DEFAULT_CALIB",
    "DEFAULT_EVAL",
    "MEASURES",
    "METRIC",
    "QUANTITIES",
    "fit_scaling",
    "measure_all",
    "measure_family",
    "measure_model",
    "non_embedding_params",
    "plot_scaling",
]

MEASURES = ("concentration", "super_random_ratio", "weights_to_double", "fraction_to_double")
QUANTITIES = {
    "concentration": "mean of the top 1% of grad_x_weight scores / their median (scale-free ratio)",
    "super_random_ratio": "ΔPPL(zero top 1% per tensor) / ΔPPL(zero random 1% per tensor) (scale-free ratio)",
    "weights_to_double": "number of top-ranked weights whose zeroing doubles PPL (a count: grows with size)",
    "fraction_to_double": "fraction of the scored weights whose zeroing (top-ranked first) doubles PPL",
}
METRIC = "grad_x_weight"
_SHARED = package_root().parent / "shared" / "data"  # the checkout's ../shared/data
DEFAULT_EVAL = _SHARED / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_CALIB = _SHARED / "wikitext-2" / "valid.txt"


# --- measuring one model ---------------------------------------------------------------------


def measure_model(
    lm,
    data,
    measure: str,
    *,
    seed: int = 0,
    n_calib: int = 4,
    batch_size: int = 4,
    scores: dict | None = None,
    top_fraction: float = 0.01,
    fraction: float = 1e-2,
    n_random: int = 5,
    factor: float = 2.0,
    progress: bool = False,
) -> float:
    """One measure (see the module doc) of ``lm`` on a ``DataBundle`` ``data``, as a float.

    ``scores`` (name -> grad_x_weight scores) skips the scoring pass; otherwise they are computed
    on ``data.calibration(n_calib, seed)``.
    """
    out = measure_all(
        lm,
        data,
        [measure],
        seed=seed,
        n_calib=n_calib,
        batch_size=batch_size,
        scores=scores,
        top_fraction=top_fraction,
        fraction=fraction,
        n_random=n_random,
        factor=factor,
        progress=progress,
    )
    return out[measure]


def measure_all(
    lm,
    data,
    measures: Iterable[str] = MEASURES,
    *,
    seed: int = 0,
    n_calib: int = 4,
    batch_size: int = 4,
    scores: dict | None = None,
    top_fraction: float = 0.01,
    fraction: float = 1e-2,
    n_random: int = 5,
    factor: float = 2.0,
    progress: bool = False,
) -> dict:
    """Several measures sharing one scoring pass and one baseline evaluation.

    Returns ``{measure: float, ..., "baseline_ppl": float, "n_scored": int, "details": {measure:
    dict of the intermediate numbers}}`` (plain Python types).
    """
    measures = list(measures)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ConfigError(f"unknown scaling measure(s) {unknown}: choose from {', '.join(MEASURES)}")
    if scores is None:
        scores = compute_scores(
            lm, METRIC, data.calibration(n_calib, seed), seed=seed, batch_size=batch_size, progress=progress
        )
    _check_scores(scores)
    base = evaluate(lm.model, data.eval_ids, batch_size=batch_size, progress=False)
    out: dict = {
        "baseline_ppl": float(base.ppl),
        "n_scored": int(sum(s.numel() for s in scores.values())),
        "details": {},
    }
    search: dict | None = None
    for m in measures:
        if m == "concentration":
            d = _concentration(scores, top_fraction)
        elif m == "super_random_ratio":
            d = _super_random_ratio(lm, data, scores, base.ppl, fraction, n_random, seed, batch_size)
        else:  # weights_to_double and fraction_to_double share one search
            search = search or _weights_to_double(lm, data, scores, base.ppl, factor, batch_size)
            d = search
            if m == "fraction_to_double":
                d = {
                    **search,
                    "value": search["value"] / out["n_scored"],
                    "weights_to_double": search["value"],
                }
        out[m] = float(d["value"])
        out["details"][m] = d
    return out


def _check_scores(scores: dict) -> None:
    if not scores:
        raise ConfigError("no scores: score at least one tensor")
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise ConfigError(f"scores of {name!r} hold NaN/inf: check the model and calibration data")
        if (s < 0).any():
            raise ConfigError(f"scores of {name!r} are negative: scaling measures need |w*g| >= 0")


def _bits(s: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 scores as int32 bit patterns (same order as the values)."""
    s = s.detach().float().contiguous().reshape(-1) + 0.0  # -0.0 -> +0.0
    return s.view(torch.int32)


def _kth_largest(scores: dict, k: int) -> float:
    """The k-th largest value (1-based) over all tensors: bisection on the float bit patterns."""
    bits = [_bits(s) for s in scores.values()]
    lo, hi = 0, 0x7F800000  # count(bits >= lo) >= k always holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(int((b >= mid).sum()) for b in bits) >= k:
            lo = mid
        else:
            hi = mid - 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))


def _concentration(scores: dict, top_fraction: float) -> dict:
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"top_fraction must be in (0, 1], got {top_fraction}")
    n = int(sum(s.numel() for s in scores.values()))
    k = max(1, math.ceil(top_fraction * n))
    v = _kth_largest(scores, k)
    above = [s.detach().float().reshape(-1) for s in scores.values()]
    sum_gt = sum(float(a[a > v].double().sum()) for a in above)
    n_gt = sum(int((a > v).sum()) for a in above)
    top_mean = (sum_gt + (k - n_gt) * v) / k
    if n % 2:
        median = _kth_largest(scores, (n + 1) // 2)
    else:
        median = 0.5 * (_kth_largest(scores, n // 2) + _kth_largest(scores, n // 2 + 1))
    value = top_mean / median if median > 0 else math.inf
    return {
        "value": value,
        "top_mean": top_mean,
        "median": median,
        "k_top": k,
        "n": n,
        "top_fraction": top_fraction,
    }


def _ppl_zeroed(lm, data, indices, batch_size: int) -> float:
    with perturbed(lm.model, indices, "zero"):
        return float(evaluate(lm.model, data.eval_ids, batch_size=batch_size, progress=False).ppl)


def _per_tensor(scores: dict, counts: dict, kind: str, seed: int) -> dict:
    return {
        n: select({n: s}, counts[n], kind, "per_layer", seed=seed, metric=METRIC).indices[n]
        for n, s in scores.items()
    }


def _super_random_ratio(lm, data, scores, base_ppl, fraction, n_random, seed, batch_size) -> dict:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if n_random < 1:
        raise ConfigError(f"n_random must be >= 1, got {n_random}")
    counts = {n: max(1, round(fraction * s.numel())) for n, s in scores.items()}
    d_top = _ppl_zeroed(lm, data, _per_tensor(scores, counts, "top", seed), batch_size) - base_ppl
    d_rand = [
        _ppl_zeroed(lm, data, _per_tensor(scores, counts, "random", seed + r), batch_size) - base_ppl
        for r in range(n_random)
    ]
    mean_rand = float(np.mean(d_rand))
    if mean_rand > 0:
        value = d_top / mean_rand
    else:
        log.warning(
            "esa: random zeroing did not raise PPL (mean dPPL %.3g): super_random_ratio = inf", mean_rand
        )
        value = math.inf if d_top > 0 else math.nan
    return {
        "value": value,
        "delta_ppl_top": d_top,
        "delta_ppl_random": d_rand,
        "delta_ppl_random_mean": mean_rand,
        "k_total": int(sum(counts.values())),
        "fraction": fraction,
        "n_random": n_random,
    }


def _weights_to_double(lm, data, scores, base_ppl, factor, batch_size) -> dict:
    if not factor > 1.0:
        raise ConfigError(f"factor must be > 1, got {factor}")
    target = factor * base_ppl
    total = int(sum(s.numel() for s in scores.values()))
    path: list[list] = []

    def reached(k: int) -> bool:
        sel = select(scores, k, "top", "global", metric=METRIC)
        ppl = _ppl_zeroed(lm, data, sel, batch_size)
        path.append([k, ppl])
        return not math.isfinite(ppl) or ppl >= target

    lo, hi = 0, 1
    while not reached(hi):
        lo = hi
        if hi == total:
            return {"value": math.inf, "target_ppl": target, "path": path, "evaluations": len(path)}
        hi = min(2 * hi, total)
    while hi - lo > 1:
        mid = min(hi - 1, max(lo + 1, round(math.sqrt(max(lo, 1) * hi))))
        if reached(mid):
            hi = mid
        else:
            lo = mid
    return {
        "value": float(hi),
        "target_ppl": target,
        "factor": factor,
        "path": path,
        "evaluations": len(path),
    }


# --- a whole family --------------------------------------------------------------------------


def measure_family(
    names: Sequence[str],
    measures: Iterable[str] = MEASURES,
    *,
    data=None,
    calib_data=None,
    max_length: int = 128,
    max_samples: int = 4,
    n_calib: int = 4,
    seed: int = 0,
    dtype=None,
    device="cpu",
    progress: bool = False,
    **options,
) -> list[dict]:
    """Load each model, prepare its data and measure it; one plain dict per model.

    ``data`` / ``calib_data`` default to WikiText-2 test / validation next to the repository
    (``../shared/data``) when present, else esa's built-in corpus. Rows hold name,
    params_total, params_non_embedding (without the input and output embeddings), n_scored,
    baseline_ppl, one key per measure and details.
    """
    if data is None and DEFAULT_EVAL.is_file():
        data = str(DEFAULT_EVAL)
    if calib_data is None and DEFAULT_CALIB.is_file():
        calib_data = str(DEFAULT_CALIB)
    measures = list(measures)
    rows = []
    for name in names:
        lm = load_model(name, dtype=dtype, device=device, seed=seed)
        bundle = prepare_data(lm.tokenizer, data, calib_data, max_length=max_length, max_samples=max_samples)
        res = measure_all(lm, bundle, measures, seed=seed, n_calib=n_calib, progress=progress, **options)
        rows.append(
            {
                "name": name,
                "params_total": lm.num_parameters,
                "params_non_embedding": non_embedding_params(lm.model),
                **res,
            }
        )
        del lm
    return rows


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameter count without the input embedding and the (untied) output embedding."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters()}
    total = sum(seen.values())
    embeddings: tuple = (model.get_input_embeddings(), model.get_output_embeddings())  # type: ignore[operator]
    for emb in embeddings:
        if emb is not None and emb.weight.data_ptr() in seen:
            total -= seen.pop(emb.weight.data_ptr())
    return total
