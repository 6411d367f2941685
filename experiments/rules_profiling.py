"""Decision rules of the phase 1 (baseline) and phase 2 (profiling) claims, and the pure
measurements they decide on.

A rule takes the claim and plain measurements, records them (``claim.measure``, with CIs from
the data) and decides: ``claim.check`` falsifies, ``claim.inconclusive`` (or a non-finite value in
``claim.expect``/``require_finite``) leaves the claim undecided. Rules never touch a model, so
experiments/test_rules_profiling.py feeds them synthetic measurements.

CIs come from the data: PPL by a bootstrap over evaluation windows (PPL = exp(mean window NLL));
set overlaps by a bootstrap over tensors (a per-layer top-k set is a union of per-tensor sets, so
the tensors are its sampling units). A claim with a CI decides three ways (`decide`): it holds
when the point and the whole 95% CI satisfy the threshold, is falsified when none of them do, and
is inconclusive when the CI straddles the threshold (the data cannot tell at this tier).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats as st

from esa import stats
from esa.claims.claim import Claim, finite
from esa.metrics.registry import SUMMARY_SAMPLE
from esa.util.bits import bits_view

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
NULLS = {  # null model of a metric's scores for the heavy-tail claim (see `null_concentrations`)
    "grad_x_weight": "permute",
    "act_mag": "permute",
    "magnitude": "normal",
    "grad_squared": "chi2",
    "hutchinson_diag": "normal",
    "hessian_diag": "normal",
}


# -- decisions shared by the rules ---------------------------------------------------------------
def decide(claim: Claim, name: str, point: float, ci, op: str, threshold: float) -> None:
    """Three-way decision of ``point <op> threshold`` with its 95% CI ``(lo, hi)``: holds when the
    point and both CI ends satisfy it, falsified when none does, else inconclusive (straddles).
    Non-finite point, CI or threshold: inconclusive."""
    lo, hi = (float(ci[0]), float(ci[1])) if ci is not None else (point, point)
    claim.measure(name, point, ci=None if ci is None else (lo, hi), key=True)
    claim.require_finite(**{name: point, "ci_low": lo, "ci_high": hi, "threshold": threshold})
    ok = [OPS[op](v, threshold) for v in (point, lo, hi)]
    text = f"{name} = {point:.6g} (95% CI [{lo:.6g}, {hi:.6g}]) {op} {threshold:.6g}"
    if not (all(ok) or not any(ok)):
        claim.inconclusive(f"{text}: the CI straddles the threshold")
    claim.check(all(ok), text if all(ok) else f"{text} does not hold: the whole CI is on the other side")


def decide_band(claim: Claim, name: str, point: float, ci, band: Sequence[float]) -> None:
    """Two-sided band ``band[0] <= point <= band[1]`` with CI ``(lo, hi)``: holds when the point
    and the CI lie inside, falsified when the CI lies entirely outside (below or above),
    inconclusive when the CI crosses a bound. Non-finite values: inconclusive."""
    low, high = float(band[0]), float(band[1])
    lo, hi = float(ci[0]), float(ci[1])
    claim.measure(name, point, ci=(lo, hi), key=True)
    claim.require_finite(**{name: point, "ci_low": lo, "ci_high": hi})
    text = f"{name} = {point:.6g} (95% CI [{lo:.6g}, {hi:.6g}]) within [{low:.6g}, {high:.6g}]"
    inside = low <= lo and hi <= high and low <= point <= high
    if not (inside or hi < low or lo > high):
        claim.inconclusive(f"{text}: the CI crosses a bound of the band")
    claim.check(inside, text if inside else f"{text} does not hold: the CI lies outside the band")


# -- measurements: perplexity over windows, set overlaps over tensors ------------------------------
def _ppl(nll, axis: int = -1):
    return np.exp(np.mean(nll, axis=axis))


def ppl_with_ci(window_nll: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """PPL = exp(mean window NLL) (windows of equal length) and its 95% bootstrap CI over windows."""
    x = np.asarray(window_nll, dtype=float)
    return float(_ppl(x)), stats.bootstrap_ci(x, stat=_ppl)


def set_counts(a, b) -> np.ndarray:
    """[T, 3] per tensor: |A_t ∩ B_t|, |A_t|, |B_t| for two selections (``.indices``: tensor name
    -> flat indices), over the tensors of either."""
    names = list(dict.fromkeys([*a.indices, *b.indices]))
    empty = torch.empty(0, dtype=torch.long)
    rows = []
    for n in names:
        x, y = set(a.indices.get(n, empty).tolist()), set(b.indices.get(n, empty).tolist())
        rows.append((len(x & y), len(x), len(y)))
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def _set_ratio(counts: np.ndarray, idx, kind: str):
    """overlap |A∩B|/min(|A|,|B|) or jaccard |A∩B|/|A∪B| of the tensors ``idx`` of counts [P, T, 3],
    averaged over the P pairs (both empty: 1)."""
    s = counts[:, np.asarray(idx, dtype=int), :].sum(axis=-2)
    inter, na, nb = s[..., 0], s[..., 1], s[..., 2]
    den = np.minimum(na, nb) if kind == "overlap" else na + nb - inter
    both_empty = (na == 0) & (nb == 0)
    with np.errstate(all="ignore"):
        ratio = np.where(both_empty, 1.0, np.where(den > 0, inter / np.where(den > 0, den, 1), 0.0))
    return ratio.mean(axis=0)


def set_ratio(counts, kind: str = "overlap") -> float:
    """``kind`` ("overlap" | "jaccard") of per-tensor counts ([T, 3], or [P, T, 3] for P pairs:
    the mean over pairs)."""
    c = np.asarray(counts, dtype=float)
    c = c[None] if c.ndim == 2 else c
    return float(_set_ratio(c, np.arange(c.shape[1]), kind))


def set_ratio_with_ci(counts, kind: str = "overlap") -> tuple[float, tuple[float, float]]:
    """`set_ratio` and its 95% CI by a bootstrap over tensors (pairs resampled jointly)."""
    c = np.asarray(counts, dtype=float)
    c = c[None] if c.ndim == 2 else c
    tensors = np.arange(c.shape[1])
    point = set_ratio(c, kind)
    if tensors.size < 2:
        return point, (point, point)
    return point, stats.bootstrap_ci(tensors, stat=lambda idx, axis=-1: _set_ratio(c, idx, kind))


# -- phase 1 ---------------------------------------------------------------------------------------
def ppl_not_leaking(claim: Claim, window_nll: Sequence[float], leak: float) -> None:
    """Baseline PPL finite (a non-finite window NLL falsifies: finiteness is claimed) and above
    ``leak``, decided on its window-bootstrap CI (`decide`)."""
    claim.measure("n_windows", len(window_nll))
    if not len(window_nll):
        claim.inconclusive("no evaluation windows")
    bad = [v for v in window_nll if not finite(v)]
    claim.check(not bad, f"non-finite window NLL: {bad[:3]}" if bad else "every window NLL is finite")
    ppl, ci = ppl_with_ci(window_nll)
    decide(claim, "ppl", ppl, ci, ">", leak)


def evaluation_deterministic(claim: Claim, first: Sequence[float], second: Sequence[float]) -> None:
    """The same windows evaluated twice give bit-identical per-window NLL (float64 bits).
    Different lengths falsify; a non-finite NLL leaves it inconclusive."""
    claim.measure("n_windows", [len(first), len(second)])
    if not len(first) or not len(second):
        claim.inconclusive("no evaluation windows")
    claim.check(len(first) == len(second), f"{len(first)} vs {len(second)} windows")
    claim.require_finite(first=float(np.sum(first)), second=float(np.sum(second)))
    a, b = (torch.tensor(list(v), dtype=torch.float64) for v in (first, second))
    differ = int((bits_view(a) != bits_view(b)).sum())
    claim.measure("max_abs_difference", float((a - b).abs().max()) if a.numel() else 0.0)
    claim.measure("windows_differing", differ, key=True)
    claim.expect(differ, "==", 0, name="windows_differing")


def ppl_ci_within(claim: Claim, window_nll: Sequence[float], tolerance: float) -> None:
    """Relative half-width (hi - lo) / 2 / PPL of the window-bootstrap 95% CI of the PPL below
    ``tolerance``. Fewer than 2 windows (no CI) or non-finite: inconclusive."""
    claim.measure("n_windows", len(window_nll))
    if len(window_nll) < 2:
        claim.inconclusive(f"{len(window_nll)} evaluation window(s): no bootstrap CI")
    ppl, (lo, hi) = ppl_with_ci(window_nll)
    claim.measure("ppl", ppl, ci=(lo, hi))
    half = (hi - lo) / 2 / ppl if finite(ppl) and ppl > 0 else math.nan
    claim.measure("relative_half_width", half, key=True)
    claim.expect(half, "<", tolerance, name="relative_half_width")


def accuracy_and_throughput(claim: Claim, accuracy: float, n_tokens: int, tokens_per_s: float) -> None:
    """Accuracy in (0, 1] (Wilson 95% CI over tokens, optimistic: tokens of a window are
    correlated) and tokens/s finite and positive; non-finite values falsify (finiteness is
    claimed). No tokens: inconclusive."""
    if not n_tokens:
        claim.inconclusive("no tokens evaluated")
    ci = None
    if finite(accuracy) and 0 <= accuracy <= 1:
        wilson = st.binomtest(round(accuracy * n_tokens), int(n_tokens)).proportion_ci(method="wilson")
        ci = (wilson.low, wilson.high)
    claim.measure("accuracy", accuracy, ci=ci, key=True)
    claim.measure("tokens_per_s", tokens_per_s)
    claim.check(finite(accuracy) and 0.0 < accuracy <= 1.0, f"accuracy = {accuracy} in (0, 1]")
    claim.check(finite(tokens_per_s) and tokens_per_s > 0, f"tokens/s = {tokens_per_s} finite and > 0")


def predicts_uniformly(claim: Claim, window_nll: Sequence[float], vocab: int) -> None:
    """Untrained model: PPL within [vocab / 2, 2 vocab], decided on its window-bootstrap CI
    (`decide_band`). Non-finite NLL: inconclusive."""
    claim.measure("vocab_size", vocab)
    claim.require_finite(window_nll_sum=float(np.sum(window_nll)) if len(window_nll) else math.nan)
    ppl, ci = ppl_with_ci(window_nll)
    decide_band(claim, "ppl", ppl, ci, (vocab / 2, vocab * 2))


# -- phase 2 ---------------------------------------------------------------------------------------
def topk_stable(
    claim: Claim, pair_counts: Sequence[np.ndarray], threshold: float, data_dependent: bool = True
) -> None:
    """Mean over seed pairs of the top-k Jaccard > ``threshold``, decided on its CI by a bootstrap
    over tensors (the pairs share seeds, so they are not independent replicates: their range is
    reported, not used as a CI). Scores that do not depend on the calibration data: inconclusive
    (stable by construction)."""
    pairs = [set_ratio(c, "jaccard") for c in pair_counts]
    claim.measure("pairwise_jaccard", pairs)
    claim.measure("jaccard_range", [min(pairs), max(pairs)] if pairs else [])
    if not pairs:
        claim.inconclusive("fewer than two seeds: no pair to compare")
    if not data_dependent:
        claim.inconclusive("the metric does not read calibration data: the same scores for every seed")
    mean, ci = set_ratio_with_ci(np.stack([np.asarray(c, dtype=float) for c in pair_counts]), "jaccard")
    decide(claim, "mean_jaccard", mean, ci, ">", threshold)


def sets_agree(claim: Claim, counts: np.ndarray, op: str, threshold: float, name: str = "overlap") -> None:
    """Overlap |A∩B|/min(|A|,|B|) of two selections ``<op> threshold``, decided on its CI by a
    bootstrap over tensors; the Jaccard is reported alongside."""
    claim.measure("jaccard", set_ratio(counts, "jaccard"))
    point, ci = set_ratio_with_ci(counts, "overlap")
    decide(claim, name, point, ci, op, threshold)


def overlap_in_band(claim: Claim, counts: np.ndarray, band: Sequence[float]) -> None:
    """Overlap of two selections inside ``band`` (two-sided), decided on its tensor-bootstrap CI."""
    claim.measure("jaccard", set_ratio(counts, "jaccard"))
    point, ci = set_ratio_with_ci(counts, "overlap")
    decide_band(claim, "overlap", point, ci, band)


def null_concentrations(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    null: str,
    draws: int,
    sample: int = SUMMARY_SAMPLE,
    seed: int = 0,
) -> list[float]:
    """``draws`` values of the `concentration` (top-1% mean / median) under a null that keeps
    each tensor's scale, on as many entries as ``score_summary`` samples (``sample``):

    - "permute" (scores |w|·f: grad_x_weight f = |g|, act_mag f = ‖X_j‖): |w_i|·f_π(i), f = s/|w|
      permuted within the tensor among entries with w != 0 (where w = 0 the factor is unknown:
      those entries keep score 0 and give no factor). Tensors sampled in part draw i uniformly
      and f at uniform nonzero positions (with replacement).
    - "normal": |z|·rms(s) and "chi2": z²·mean(s), z ~ N(0, 1) per entry (Gaussian weights,
      curvature estimates; squared Gaussian gradients)."""
    total = sum(int(s.numel()) for s in scores.values())
    gen = torch.Generator().manual_seed(int(seed))
    parts = []  # per tensor [draws, m]
    for name, score in scores.items():
        s = score.detach().reshape(-1)
        m = s.numel() if total <= sample else max(1, round(sample * s.numel() / total))
        if null == "permute":
            parts.append(_permuted(s, weights[name].detach().reshape(-1), draws, m, gen))
            continue
        s64 = s.double()
        scale = float(s64.pow(2).mean().sqrt() if null == "normal" else s64.mean())
        z = torch.randn(draws, m, generator=gen, dtype=torch.float64)
        parts.append(((z.abs() if null == "normal" else z.square()) * scale).float())
    return [concentration(row) for row in torch.cat(parts, dim=1).numpy()]


def _permuted(s: torch.Tensor, w: torch.Tensor, draws: int, m: int, gen) -> torch.Tensor:
    """[draws, m] null scores |w_i|·f_j of one tensor (flat scores ``s``, weights ``w``)."""
    n, nonzero = s.numel(), w != 0
    if not bool(nonzero.any()):
        return torch.zeros(draws, m)
    if m >= n:  # the whole tensor: exact permutations of the factors over the nonzero weights
        nz = nonzero.nonzero().flatten()
        absw = w[nz].double().abs()
        factor = s[nz].double() / absw
        out = torch.zeros(draws, n)
        for d in range(draws):
            perm = torch.randperm(nz.numel(), generator=gen).to(factor.device)
            out[d, : nz.numel()] = (absw * factor[perm]).float().cpu()
        return out
    i = torch.randint(0, n, (draws, m), generator=gen).to(w.device)
    j = _nonzero_positions(w, nonzero, (draws, m), gen).to(w.device)
    return (w[i].double().abs() * (s[j].double() / w[j].double().abs())).float().cpu()


def _nonzero_positions(w: torch.Tensor, nonzero: torch.Tensor, shape, gen) -> torch.Tensor:
    """Uniform positions of nonzero entries of ``w`` (rejection; listing them if zeros abound)."""
    j = torch.randint(0, w.numel(), shape, generator=gen)
    for _ in range(8):
        bad = ~nonzero[j.to(w.device)].cpu()
        if not bool(bad.any()):
            return j
        j[bad] = torch.randint(0, w.numel(), (int(bad.sum()),), generator=gen)
    nz = nonzero.nonzero().flatten().cpu()
    bad = ~nonzero[j.to(w.device)].cpu()
    j[bad] = nz[torch.randint(0, nz.numel(), (int(bad.sum()),), generator=gen)]
    return j


def concentration(values: np.ndarray) -> float:
    """Top-1% mean / median of ``values``: ``score_summary``'s "concentration" (the same
    definition, by an O(n) partition instead of two sorts: a null needs dozens of them)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    k = max(1, math.ceil(0.01 * x.size))
    median, top = float(np.median(x)), float(np.partition(x, x.size - k)[x.size - k :].mean())
    return top / median if median > 0 else (math.inf if top > 0 else math.nan)


def heavy_tailed(claim: Claim, observed: float, null: Sequence[float], ratio: float, alpha: float) -> None:
    """Observed concentration > ``ratio`` AND beyond its null: empirical p-value
    (``esa.stats.empirical_p_value``) < ``alpha``. Non-finite observed or null, or too few null
    draws to reach p < alpha (n < 1/alpha - 1): inconclusive."""
    null = [float(v) for v in null]
    p = stats.empirical_p_value(observed, null) if null else math.nan
    claim.measure("concentration", observed, key=True)
    claim.measure("null_draws", len(null))
    claim.measure("null_median", float(np.median(null)) if null else math.nan)
    claim.measure("null_p95", float(np.percentile(null, 95)) if null else math.nan)
    claim.measure("p_value", p)
    if len(null) + 1 < 1 / alpha:
        claim.inconclusive(f"{len(null)} null draws cannot give p < {alpha}")
    claim.require_finite(concentration=observed, null_max=max(null), p_value=p)
    claim.expect(observed, ">", ratio, name="concentration")
    text = f"p = {p:.4g} < {alpha} against the null (median {np.median(null):.4g})"
    claim.check(p < alpha, text if p < alpha else f"{text} does not hold")


def layer_mass(scores: Mapping[str, torch.Tensor], layer_of: Mapping[str, int | None]) -> dict[int, float]:
    """Summed score per decoder layer (tensors without a layer index are left out)."""
    out: dict[int, float] = {}
    for name, s in scores.items():
        layer = layer_of.get(name)
        if layer is not None:
            out[int(layer)] = out.get(int(layer), 0.0) + float(s.detach().double().sum())
    return out


def top_layers_hold_mass(
    claim: Claim, masses: Sequence[Mapping[int, float]], fraction: float, share: float
) -> None:
    """The top ``floor(fraction · L)`` layers by summed score hold more than ``share`` of the total,
    per calibration seed (``masses``: one layer -> mass map per seed). Holds when every seed's
    share exceeds it, falsified when none does, inconclusive when the seeds disagree, with fewer
    than 1/fraction layers (no whole number of layers is that fraction), or non-finite masses."""
    shares, layers = [], []
    for mass in masses:
        values = sorted(mass.values(), reverse=True)
        n_top = max(1, math.floor(fraction * len(values) + 1e-9))  # reported even with < 1/fraction
        total = sum(values)
        layers.append(len(values))
        shares.append(sum(values[:n_top]) / total if finite(total) and total > 0 else math.nan)
    claim.measure("layers", layers[0] if layers else 0)
    claim.measure("top_layers", max(1, math.floor(fraction * layers[0] + 1e-9)) if layers else 0)
    claim.measure("share_per_seed", shares)
    key = float(np.mean(shares)) if shares else math.nan
    claim.measure("top_layer_share", key, ci=(min(shares), max(shares)) if shares else None, key=True)
    if not layers or min(layers) * fraction < 1 - 1e-9:
        claim.inconclusive(f"{min(layers, default=0)} layers: fewer than {math.ceil(1 / fraction)}")
    claim.require_finite(**{f"share_seed{i}": v for i, v in enumerate(shares)})
    above = [v > share for v in shares]
    text = f"top-layer share per seed {[round(v, 4) for v in shares]} > {share}"
    if any(above) and not all(above):
        claim.inconclusive(f"{text} holds for some seeds only")
    claim.check(all(above), text if all(above) else f"{text} does not hold for any seed")


def spans_tensors(claim: Claim, counts: Mapping[str, int]) -> None:
    """A selection spans more than one tensor. Empty selection: inconclusive."""
    size = sum(counts.values())
    if size == 0:
        claim.inconclusive("empty selection")
    tensors = sum(1 for v in counts.values() if v > 0)
    claim.measure("largest_tensor_share", max(counts.values()) / size)
    claim.measure("tensors", tensors, key=True)
    claim.expect(tensors, ">", 1, name="tensors")


def not_all_embeddings(claim: Claim, in_embedding: Sequence[bool]) -> None:
    """Not every selected entry lies in the embedding / lm_head tensors. Empty: inconclusive."""
    if not len(in_embedding):
        claim.inconclusive("empty selection")
    share = float(np.mean(np.asarray(in_embedding, dtype=bool)))
    claim.measure("embedding_share", share, key=True)
    claim.expect(share, "<", 1.0, name="embedding_share")
