"""Phase 2 — sensitivity profiling: top-k sets are stable, heavy-tailed, agree across metrics
and modes, and are not concentrated in one tensor or in the embeddings."""

import itertools

import pytest
from criteria import (
    HEAVY_TAIL_RATIO,
    HUTCHINSON_AGREEMENT,
    JACCARD_STABLE,
    JACCARD_STRONG,
    METRIC_AGREEMENT,
    MODE_AGREEMENT,
)

from esa import plots, stats
from esa.metrics.registry import score_summary

pytestmark = [pytest.mark.phase2, pytest.mark.smoke]


def test_topk_stable_across_seeds(claim, workbench, model, metric):
    """Top-k sets (per tensor) from different calibration seeds overlap: mean Jaccard > 0.3."""
    seeds = workbench.tier.seeds
    sels = [workbench.selection(model, metric, s) for s in seeds]
    pairs = [a.jaccard(b) for a, b in itertools.combinations(sels, 2)]
    mean = sum(pairs) / len(pairs)
    claim(threshold=JACCARD_STABLE).context(
        model=model, metric=metric, seeds=list(seeds), k=workbench.tier.topk, mode="per_layer"
    )
    claim.measure("mean_jaccard", mean, ci=stats.bootstrap_ci(pairs), key=True)
    claim.measure("pairwise_jaccard", pairs)
    claim.measure(f"strongly_stable (> {JACCARD_STRONG})", mean > JACCARD_STRONG)
    claim.expect(mean, ">", JACCARD_STABLE, name="mean_jaccard")


def test_scores_heavy_tailed(claim, workbench, model, metric):
    """The mean of the top 1% of scores exceeds 10x the median score."""
    scores = workbench.scores(model, metric, workbench.tier.seeds[0])
    summary = score_summary(scores)
    claim(threshold=HEAVY_TAIL_RATIO).context(model=model, metric=metric, seeds=[workbench.tier.seeds[0]])
    claim.measure("concentration", summary["concentration"], key=True)
    claim.measure("median", summary["median"])
    claim.measure("top1pct_mean", summary["top1pct_mean"])
    claim.measure("max", summary["max"])
    claim.figure(plots.plot_score_distribution(scores, f"{metric} scores, {model}"), "score distribution")
    claim.expect(summary["concentration"], ">", HEAVY_TAIL_RATIO, name="concentration")


def test_gradient_metrics_agree(claim, workbench, model):
    """grad_x_weight and grad_squared pick mostly the same top-k weights (overlap >= 60%)."""
    seed = workbench.tier.seeds[0]
    a = workbench.selection(model, "grad_x_weight", seed)
    b = workbench.selection(model, "grad_squared", seed)
    value = a.overlap(b)
    claim(threshold=METRIC_AGREEMENT).context(
        model=model, metric="grad_x_weight vs grad_squared", seeds=[seed], k=workbench.tier.topk
    )
    claim.measure("overlap", value, key=True)
    claim.measure("jaccard", a.jaccard(b))
    claim.expect(value, ">=", METRIC_AGREEMENT, name="overlap")


def test_hutchinson_agrees_with_grad_x_weight(claim, workbench, model):
    """hutchinson_diag and grad_x_weight top-k sets overlap by at least 50%."""
    seed = workbench.tier.seeds[0]
    a = workbench.selection(model, "hutchinson_diag", seed)
    b = workbench.selection(model, "grad_x_weight", seed)
    value = a.overlap(b)
    claim(threshold=HUTCHINSON_AGREEMENT).context(
        model=model,
        metric="hutchinson_diag vs grad_x_weight",
        seeds=[seed],
        k=workbench.tier.topk,
        hutchinson_samples=workbench.tier.hutchinson_samples,
    )
    claim.measure("overlap", value, key=True)
    claim.expect(value, ">=", HUTCHINSON_AGREEMENT, name="overlap")


def test_per_layer_and_global_agree(claim, workbench, model, metric):
    """More than half of the global top-k lies inside the per-tensor top-k sets."""
    seed = workbench.tier.seeds[0]
    glob = workbench.selection(model, metric, seed, mode="global")
    per = workbench.selection(model, metric, seed, mode="per_layer")
    value = glob.overlap(per)
    claim(threshold=MODE_AGREEMENT).context(model=model, metric=metric, seeds=[seed], k=workbench.tier.topk)
    claim.measure("overlap", value, key=True)
    claim.expect(value, ">", MODE_AGREEMENT, name="overlap")


def _global_with_embeddings(workbench, model, metric):
    seed = workbench.tier.seeds[0]
    sel = workbench.selection(model, metric, seed, mode="global", include_embeddings=True)
    frame = sel.to_frame(workbench.model(model).param_map)
    frame["layer"] = frame["layer"].fillna(-1).astype(int)  # -1: embeddings / lm_head / final norm
    return sel, frame


def test_topk_not_in_one_tensor(claim, workbench, model, metric):
    """The global top-k (embeddings included) spans more than one tensor."""
    sel, frame = _global_with_embeddings(workbench, model, metric)
    counts = sel.by_tensor_counts()
    claim(threshold=1).context(
        model=model, metric=metric, k=workbench.tier.topk, mode="global", include_embeddings=True
    )
    claim.measure("tensors", len(counts), key=True)
    claim.measure("largest_tensor_share", max(counts.values()) / sel.size)
    claim.figure(
        plots.plot_layer_component_heatmap(frame, "count", f"global top-{sel.size}, {model}"),
        "layer x component heatmap",
    )
    claim.expect(len(counts), ">", 1, name="tensors")


def test_topk_not_all_embeddings(claim, workbench, model, metric):
    """The global top-k (embeddings included) is not all in the embedding / lm_head tensors."""
    _sel, frame = _global_with_embeddings(workbench, model, metric)
    share = float(frame["component"].isin(["embed", "lm_head"]).mean())
    claim(threshold=1.0).context(
        model=model, metric=metric, k=workbench.tier.topk, mode="global", include_embeddings=True
    )
    claim.measure("embedding_share", share, key=True)
    claim.expect(share, "<", 1.0, name="embedding_share")
