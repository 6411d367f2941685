"""Unstructured pruning guided by a sensitivity metric (Wanda / magnitude-pruning protocol).

Scores follow ``esa.metrics.registry``: a higher score means a more important weight, so pruning removes
the LOWEST-scoring fraction of each comparison group and keeps the rest.

Comparison groups (``granularity``):

- ``"row"``: every vector along the last dimension, i.e. each output row of an ``[out, in]``
  matrix (the weights feeding one output unit) and, for fused 3-D expert tensors
  ``[experts, out, in]``, each row of each expert. This is Wanda's group (Sun et al. 2023:
  ``|W_ij| * ||X_j||_2`` compared within output row i). 1-D tensors form a single group.
- ``"layer"``: the whole tensor is one group (classic magnitude pruning compares ``|W|`` over the
  layer).

Semi-structured N:M (``sparsity="2:4"``, Wanda/SparseGPT's hardware pattern): every block of M
consecutive entries along the last dimension loses its N lowest-scoring entries (sparsity N/M;
the granularity does not apply). The last dimension must be a multiple of M.

Exactly ``n_pruned(sparsity, group_size)`` = floor(sparsity x group size) entries are removed
from every group, so each group's achieved sparsity is exactly the requested one (up to the
floor). Ties are broken deterministically: among equal scores the lower index is pruned first.
NaN scores count as the most important (pruned last), as ``esa.select`` treats NaN for "bottom".

Baselines (docs/REFERENCES.md, "Pruning baselines"): magnitude = ``magnitude`` metric (|W|) with
``granularity="layer"``; Wanda = ``act_mag`` metric with ``granularity="row"``.
``pruning_table`` measures perplexity on the evaluation windows after pruning every scored
tensor by each (metric, granularity); ``compare_at`` compares the best sensitivity-guided
method (any metric other than magnitude and act_mag) with both baselines.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from esa.errors import ConfigError, RestoreError
from esa.evaluate import evaluate
from esa.metrics import compute_scores
from esa.util.bits import bits_view

log = logging.getLogger("esa")

GRANULARITIES = ("row", "layer")
DEFAULT_METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared", "hutchinson_diag")
BASELINE_METRICS = ("magnitude", "act_mag")
COLUMNS = ["metric", "granularity", "sparsity", "pattern", "ppl", "dense_ppl", "ratio"]
COLUMNS += ["n_pruned", "n_weights", "achieved_sparsity"]


def n_pruned(sparsity: float, group_size: int) -> int:
    """Entries pruned from a group: floor(sparsity x group_size).

    The product is rounded to 6 decimals first so that float noise does not lose an entry
    (0.29 x 100 is 28.999999999999996 in binary floating point; this returns 29).
    """
    return math.floor(round(float(sparsity) * int(group_size), 6))


def parse_pattern(sparsity) -> tuple[int, int] | None:
    """``"N:M"`` -> (N, M) with 0 <= N <= M, M >= 1; None for a number (unstructured)."""
    if not isinstance(sparsity, str):
        return None
    parts = sparsity.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pruning pattern must be 'N:M', e.g. '2:4', got {sparsity!r}")
    n, m = int(parts[0]), int(parts[1])
    if m < 1 or n > m:
        raise ConfigError(f"pruning pattern {sparsity!r} needs 0 <= N <= M and M >= 1; pass e.g. '2:4'")
    return n, m


def prune_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float | str, granularity: str = "row"
) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) pruning the lowest-scoring ``sparsity`` fraction of each group,
    or N of every M consecutive entries for ``sparsity="N:M"``.

    ``scores`` is name -> score tensor (``esa.metrics.compute_scores`` output); each mask has the
    score's shape and device. See the module doc for groups, counts and tie-breaking.
    """
    nm = parse_pattern(sparsity)
    if nm is None:
        sparsity = _check_sparsity(sparsity)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if not scores:
        raise ConfigError("no scores to prune by; compute scores for at least one tensor first")
    masks = {}
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise ConfigError(f"score for {name!r} is not a tensor; pass dict name -> torch.Tensor")
        masks[name] = _mask(score, float(sparsity), granularity) if nm is None else _mask_nm(name, score, *nm)
    return masks


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be a number in [0, 1], got {sparsity!r}; pass e.g. 0.5")
    return float(sparsity)


def _key(score: torch.Tensor) -> torch.Tensor:
    """Sort key: float32 or wider, NaN -> +inf (kept longest)."""
    key = score.detach()
    if not key.is_floating_point() or key.dtype in (torch.float16, torch.bfloat16):
        key = key.float()
    return torch.nan_to_num(key, nan=float("inf")) if torch.isnan(key).any() else key


def _mask_nm(name: str, score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: the n lowest of each m consecutive entries along the last dim (stable
    ascending sort, so ties go by lower index)."""
    if score.ndim == 0 or score.shape[-1] % m:
        raise ConfigError(
            f"{name!r} has last dimension {tuple(score.shape)[-1:]}, not a multiple of {m}; "
            f"prune it unstructured or pass names= without it"
        )
    blocks = _key(score).reshape(-1, m)
    cut = torch.zeros(blocks.shape, dtype=torch.bool, device=blocks.device)
    cut.scatter_(1, torch.argsort(blocks, dim=1, stable=True)[:, :n], True)
    return (~cut).reshape(score.shape)


def _mask(score: torch.Tensor, sparsity: float, granularity: str) -> torch.Tensor:
    key = _key(score)
    if granularity == "row" and key.ndim >= 2:
        groups = key.reshape(-1, key.shape[-1])
    else:
        groups = key.reshape(1, -1)
    k = n_pruned(sparsity, groups.shape[1])
    if k == 0 or groups.numel() == 0:
        return torch.ones(score.shape, dtype=torch.bool, device=key.device)
    if k == groups.shape[1]:
        return torch.zeros(score.shape, dtype=torch.bool, device=key.device)
    # The k-th smallest score per group; everything below it goes, then ties at it by index.
    # Same result as a stable ascending argsort cut at k, in O(n) instead of a sort.
    threshold = torch.kthvalue(groups, k, dim=1, keepdim=True).values
    keep = groups > threshold
    if bool((keep.sum(dim=1) == groups.shape[1] - k).all()):  # no excess ties (the usual case)
        return keep.reshape(score.shape)
    below, ties = groups < threshold, groups == threshold
    need = k - below.sum(dim=1, keepdim=True)
    return (~(below | (ties & (ties.cumsum(dim=1) <= need)))).reshape(score.shape)


def mask_indices(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat indices (CPU, ascending) of the pruned entries (mask False) per tensor, e.g. to
    build a selection for ``esa.perturb.perturbed``."""
    return {n: (~m).reshape(-1).nonzero().flatten().cpu() for n, m in masks.items()}


@dataclass
class PruneInfo:
    """What ``pruned`` did: entries zeroed (``n_selected``) and the tensors touched."""

    n_selected: int
    params: tuple[str, ...]
    verified: bool = False


@contextlib.contextmanager
def pruned(model, masks: Mapping[str, torch.Tensor]) -> Iterator[PruneInfo]:
    """Zero the entries whose mask is False, in place; restore them bit-exactly on exit.

    The contract of ``esa.perturb.perturbed(..., "zero")``: on exit, also on exceptions, every
    touched tensor is written back and compared bitwise with its saved copy, raising
    ``RestoreError`` if it differs. Unlike ``perturbed`` it saves a full copy of each masked
    tensor (on its device) instead of the selected entries and their flat indices: pruning
    selects a large fraction of every tensor, where an entry-wise copy plus its index costs
    about as much memory and much more time. Yields a ``PruneInfo``.
    """
    params = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
    plan = []
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(f"masked tensor {name!r} is not a parameter of the model; rebuild the masks")
        param = params[name]
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask for {name!r} must be a bool tensor (True = keep), not {mask.dtype}")
        if tuple(mask.shape) != tuple(param.shape):
            raise ConfigError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(param.shape)}; rebuild masks from this model's scores"
            )
        if not param.dtype.is_floating_point:
            raise ConfigError(f"parameter {name!r} has dtype {param.dtype}; only float weights")
        plan.append((name, param, mask.to(param.device)))
    saved = []
    info = None
    try:
        with torch.no_grad():
            for name, param, _keep in plan:  # snapshot everything before changing anything
                saved.append((name, param, param.data.clone()))
            n_cut = 0
            for _, param, keep in plan:
                cut = ~keep
                param.data.masked_fill_(cut, 0)
                n_cut += int(cut.sum())
        info = PruneInfo(n_cut, tuple(n for n, *_ in plan))
        yield info
    finally:
        with torch.no_grad():
            for _, param, original in reversed(saved):
                param.data.copy_(original)
            for name, param, original in saved:
                if not torch.equal(bits_view(param.data), bits_view(original)):
                    raise RestoreError(
                        f"restore of {name!r} was not bit-exact; this is an esa bug, report it"
                    )
        if info is not None:
            info.verified = True


def _methods(metrics, granularity, methods) -> list[tuple[str, str]]:
    if methods is not None:
        pairs = [(str(m), str(g)) for m, g in methods]
    else:
        grans = (granularity,) if isinstance(granularity, str) else tuple(granularity)
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        pairs = list(itertools.product(metrics, grans))
    for _, g in pairs:
        if g not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {g!r}; use one of {', '.join(GRANULARITIES)}")
    if not pairs:
        raise ConfigError("no (metric, granularity) pairs to measure; pass metrics= and granularity=")
    return list(dict.fromkeys(pairs))


def _jobs(grans: Sequence[str], sparsities: Sequence) -> list[tuple[str, float | str]]:
    """(granularity, sparsity) evaluations of one metric: every pair for numbers, one ("row")
    per N:M pattern, whose blocks ignore the granularity."""
    out: list[tuple[str, float | str]] = []
    for s in sparsities:
        out += [("row", s)] if parse_pattern(s) else [(g, s) for g in grans]
    return out


def pruning_table(
    lm,
    data,
    metrics: Sequence[str] = DEFAULT_METRICS,
    sparsities: Sequence[float | str] = (0.1, 0.2, 0.3, 0.5),
    granularity: str | Sequence[str] = ("row", "layer"),
    seed: int = 0,
    *,
    methods: Sequence[tuple[str, str]] | None = None,
    n_calib: int = 8,
    batch_size: int = 4,
    eval_batch_size: int = 8,
    hutchinson_samples: int = 8,
    names: Sequence[str] | None = None,
    scores: Mapping[str, Mapping] | None = None,
    dense_ppl: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Perplexity after pruning by each (metric, granularity) at each sparsity.

    ``data`` is an ``esa.data.DataBundle`` (evaluation = ``data.eval_ids``, calibration =
    ``data.calibration(n_calib, seed)``). The pairs are ``metrics x granularity`` unless
    ``methods`` lists them explicitly. Each metric is scored once (``compute_scores`` with
    ``seed``, ``batch_size``, ``hutchinson_samples``, ``names``) unless ``scores[metric]``
    supplies the scores. The default ``names`` are the model's scorable weight matrices, so
    embeddings, LM head and norms are not pruned (as in Wanda/SparseGPT). Every scored tensor
    is pruned at once; the model is restored bit-exactly after each evaluation. A sparsity
    ``"N:M"`` is measured once per metric (granularity ``"row"``: its blocks lie in rows), with
    sparsity N/M and pattern "N:M"; numbers have pattern "unstructured". ``dense_ppl`` (the
    unpruned model's PPL on these windows, if already known) saves one evaluation.

    Columns: metric, granularity, sparsity, pattern, ppl, dense_ppl, ratio (= ppl / dense_ppl), n_pruned,
    n_weights, achieved_sparsity (n_pruned / n_weights over all pruned tensors). Non-finite
    perplexities stay ``inf``/``nan``. ``df.attrs`` records the protocol.
    """
    pairs = _methods(metrics, granularity, methods)
    sparsities = [s if parse_pattern(s) else _check_sparsity(s) for s in sparsities]
    windows = data.eval_ids
    calib = data.calibration(n_calib, seed)
    if dense_ppl is None:
        dense_ppl = evaluate(lm.model, windows, batch_size=eval_batch_size, progress=False).ppl
    dense = float(dense_ppl)
    rows = []
    by_metric: dict[str, list[str]] = {}
    for m, g in pairs:
        by_metric.setdefault(m, []).append(g)
    jobs = {m: _jobs(grans, sparsities) for m, grans in by_metric.items()}
    total = sum(len(j) for j in jobs.values())
    bar = tqdm(total=total, desc="prune", disable=not progress, leave=False, unit="eval")
    try:
        for metric in by_metric:
            if scores is not None and metric in scores:
                metric_scores = dict(scores[metric])
            else:
                metric_scores = compute_scores(
                    lm,
                    metric,
                    calib,
                    seed=seed,
                    batch_size=batch_size,
                    hutchinson_samples=hutchinson_samples,
                    names=None if names is None else list(names),
                    progress=progress,
                )
            n_weights = sum(int(s.numel()) for s in metric_scores.values())
            for g, s in jobs[metric]:
                masks = prune_masks(metric_scores, s, g)
                n_cut = sum(int((~m).sum()) for m in masks.values())
                with pruned(lm.model, masks):
                    ppl = evaluate(lm.model, windows, batch_size=eval_batch_size, progress=False).ppl
                del masks
                log.info("esa: prune %s/%s at %s: ppl %.4g (dense %.4g)", metric, g, s, ppl, dense)
                nm = parse_pattern(s)
                frac = nm[0] / nm[1] if nm else s
                vals = (metric, g, frac, s if nm else "unstructured", ppl, dense, ppl / dense, n_cut)
                rows.append(
                    dict(zip(COLUMNS, (*vals, n_weights, n_cut / n_weights if n_weights else math.nan)))
                )
                bar.update(1)
            del metric_scores
    finally:
        bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    shape = {"eval_windows": int(windows.shape[0]), "window_length": int(windows.shape[1])}
    table.attrs.update(model=lm.name, seed=int(seed), n_calib=int(calib.shape[0]), dense_ppl=dense, **shape)
    table.attrs.update(hutchinson_samples=int(hutchinson_samples), batch_size=int(batch_size))
    return table


def _ppl_key(ppl: float) -> float:
    return ppl if not math.isnan(ppl) else math.inf


def _improvement(baseline: float, best: float) -> float:
    """(baseline - best) / baseline; 1.0 when only the baseline is infinite, NaN if undefined."""
    if math.isfinite(baseline) and math.isfinite(best):
        return (baseline - best) / baseline
    if not math.isfinite(baseline) and math.isfinite(best):
        return 1.0
    return math.nan


def _row(frame: pd.DataFrame) -> dict | None:
    if frame.empty:
        return None
    frame = frame.assign(_key=frame["ppl"].map(_ppl_key)).sort_values(["_key", "metric", "granularity"])
    r = frame.iloc[0]
    return {"metric": str(r["metric"]), "granularity": str(r["granularity"]), "ppl": float(r["ppl"])}


def compare_at(table: pd.DataFrame, sparsity: float | str = 0.5) -> dict:
    """The best sensitivity-guided method vs the magnitude and Wanda baselines at ``sparsity``.

    Sensitivity-guided = every metric other than ``magnitude`` and ``act_mag``; best = lowest
    perplexity over its granularities (NaN counts as worst). Magnitude baseline = ``magnitude``
    at ``layer`` granularity (the classic one; ``row`` if only that was measured); Wanda =
    ``act_mag`` at ``row``. Relative improvement = (ppl_baseline - ppl_best) / ppl_baseline
    (positive = the sensitivity-guided method is better; 1.0 when only the baseline is
    infinite; NaN when undefined). Missing entries are None. ``sparsity="N:M"`` compares the
    rows of that pattern; a number compares unstructured rows (all rows if the table has no
    ``pattern`` column).
    """
    nm = parse_pattern(sparsity)
    value = nm[0] / nm[1] if nm else float(sparsity)
    at = table[(table["sparsity"] - value).abs() < 1e-9]
    if "pattern" in table.columns:
        at = at[at["pattern"] == (sparsity if nm else "unstructured")]
    if at.empty:
        raise ConfigError(
            f"no rows at sparsity {sparsity} in the table; measured: "
            f"{sorted(set(table['sparsity'].tolist()))}"
        )
    mags = at[at["metric"] == "magnitude"]
    mag = _row(mags[mags["granularity"] == "layer"]) or _row(mags)
    acts = at[at["metric"] == "act_mag"]
    wanda = _row(acts[acts["granularity"] == "row"])
    best = _row(at[~at["metric"].isin(BASELINE_METRICS)])
    out = {
        "sparsity": value,
        "pattern": sparsity if nm else "unstructured",
        "dense_ppl": float(at["dense_ppl"].iloc[0]),
        "best": best,
        "magnitude": mag,
        "wanda": wanda,
        "improvement_vs_magnitude": None,
        "improvement_vs_wanda": None,
    }
    if best is not None and mag is not None:
        out["improvement_vs_magnitude"] = _improvement(mag["ppl"], best["ppl"])
    if best is not None and wanda is not None:
        out["improvement_vs_wanda"] = _improvement(wanda["ppl"], best["ppl"])
    return out
