"""Phase 5.3 — interpretability of the super weight (issue 11): super-activation tracing (which layer,
which tokens, how large, how it propagates, with and without the super weight), the stop-word
probability shift when the super weight is removed (Yu et al. 2024), and attention sinks.

The super weight is the detector's primary candidate (``esa.analyses.detect``, the paper's prompt;
largest |output activation|); the measurements (``esa.analyses.interpret``) run on the session's
evaluation windows. The head claim reads the session's global top-k (as the architecture claims of
phase 4) per attention head slice (``esa.analyses.components.per_head``). Decision rules: rules_interpret.py (unit tests: test_rules_interpret.py)."""

import pytest
import rules_interpret as rules
from criteria import (
    HEAD_CONCENTRATION,
    HEAD_MIN_EXPECTED,
    HEAD_NULL_DRAWS,
    HEAD_P,
    HEAD_TOP_FRACTION,
    INTERPRET_WINDOWS,
    PERSIST_FACTOR,
    STOPWORD_FACTOR,
    STOPWORDS,
)
from rules_applications import measured_at_min_tier

from esa.analyses import components, interpret
from esa.analyses.detect import candidate_selection, detect_super_weights
from esa.analyses.heads_plot import plot_head_heatmap
from esa.models.registry import is_random_init
from esa.perturb import perturbed

pytestmark = [pytest.mark.phase5, pytest.mark.smoke]
_MEMO: dict = {}
STOPWORD_REASON = "two forward passes over all evaluation windows (~40 s at smoke on a CPU core)"


def super_weight(claim, workbench, model, claims_existence: bool = False):
    """(lm, primary candidate, its zeroing selection), detected once per worker. When the detector
    finds no super weight the claim is falsified if it claims one exists (``claims_existence``),
    else inconclusive: there is no super layer or weight to measure against (a result of the
    detector, reported by the tracing claim)."""
    if model not in _MEMO:
        lm = workbench.model(model)
        report = detect_super_weights(lm)
        cand = max(report.candidates, key=lambda c: abs(c.output_activation)) if report.candidates else None
        sel = candidate_selection([cand], report.shapes) if cand else None
        _MEMO[model] = (lm, cand, sel)
    lm, cand, sel = _MEMO[model]
    if cand is None and not claims_existence:
        claim.inconclusive("no activation spike: the detector found no super weight to measure against")
    claim.check(cand is not None, "no activation spike: the detector found no super weight")
    claim.context(model=model, super_weight=f"layer {cand.layer} row {cand.row} col {cand.col}")
    return lm, cand, sel


def test_super_activation_traced(claim, workbench, model):
    """The super activation appears at the detected layer and persists in the residual stream.

    Hypothesis: the super weight's layer produces the model's largest down_proj input (the super
    activation), and the residual stream carries it through the later layers (Yu et al. 2024;
    massive activations, Sun et al. 2024).
    Measurement: hooks on every down_proj and decoder block over the first INTERPRET_WINDOWS
    evaluation windows: per window
    and layer the max |down_proj input| and max |residual stream| with their token positions / ids;
    the same with the super weight zeroed (reported and plotted).
    Decision: `rules.super_activation_persists`: peak down_proj layer == detected layer, and the
    geometric mean over windows of median residual max after / before the super layer has its
    bootstrap CI >= PERSIST_FACTOR.
    Minimum tier: smoke (two forward passes).
    Falsified if: the detector finds no super weight, the largest down_proj input is in another
    layer, or the residual max after the super layer falls below PERSIST_FACTOR x its level before it.
    """
    claim(threshold=PERSIST_FACTOR)
    lm, cand, sel = super_weight(claim, workbench, model, claims_existence=True)
    ids = workbench.data(model).eval_ids[:INTERPRET_WINDOWS]
    original = interpret.trace_activations(lm, ids)
    with perturbed(lm.model, sel, "zero"):
        zeroed = interpret.trace_activations(lm, ids)
    s = cand.layer
    claim.context(
        windows=int(ids.shape[0]),
        positions_at_super_layer=[int(p) for p in original.down_pos[:, s]],
        tokens_at_super_layer=[int(t) for t in original.down_token[:, s]],
        trace=original.summary(),
        trace_zeroed=zeroed.summary(),
    )
    claim.figure(
        interpret.plot_trace(original, zeroed, s, title=f"{model}: super activation, layer {s}"),
        "max |activation| per layer: down_proj input (red) and residual stream (blue); dashed: super weight zeroed",
    )
    rules.super_activation_persists(claim, original.down_max, original.resid_max, s, PERSIST_FACTOR)


@pytest.mark.min_tier("standard", reason=STOPWORD_REASON)
def test_stopword_shift_when_super_weight_zeroed(claim, workbench, model, request):
    """Zeroing the super weight moves next-token probability mass onto stop words.

    Hypothesis: Yu et al. 2024: without the super weight the model raises the probability of stop
    words (the super activation suppresses them).
    Measurement: per evaluation window, the mean over positions of the softmax mass on the
    single-token " word" forms of STOPWORDS, with the original model and with the super weight zeroed.
    Decision: `rules.stopword_shift`: mean(zeroed) / mean(original) with its paired bootstrap CI
    over windows >= STOPWORD_FACTOR.
    Minimum tier: standard (two forward passes over all evaluation windows with full-vocabulary
    softmax; ~40 s at smoke on a CPU core).
    Falsified if: the CI of the ratio lies below STOPWORD_FACTOR (no super weight detected:
    inconclusive, nothing to zero).
    """
    claim(threshold=STOPWORD_FACTOR)
    measured_at_min_tier(claim, request.node, workbench.tier)
    lm, _, sel = super_weight(claim, workbench, model)
    ids, bs = workbench.data(model).eval_ids, workbench.tier.batch_size
    stop = interpret.stopword_ids(lm.tokenizer, STOPWORDS)
    claim.context(stopword_tokens=len(stop), windows=int(ids.shape[0]))
    original = interpret.stopword_mass(lm, ids, stop, bs)
    with perturbed(lm.model, sel, "zero"):
        zeroed = interpret.stopword_mass(lm, ids, stop, bs)
    rules.stopword_shift(claim, original, zeroed, STOPWORD_FACTOR)


def test_attention_sink_after_super_layer(claim, workbench, model):
    """Layers after the super layer attend more to the first token than layers up to it.

    Hypothesis: the super activation sits on the first token and acts like a bias; later layers
    use that token as an attention sink (Sun et al. 2024), earlier ones cannot yet.
    Measurement: eager attention on the first INTERPRET_WINDOWS evaluation windows; per layer and head
    the mean share of attention on position 0 over query positions >= 1.
    Decision: `rules.sink_after_super_layer`: mean share of heads after the super layer − heads up to
    it, bootstrap CI over heads above 0.
    Minimum tier: smoke (one eager forward pass).
    Falsified if: the CI of the difference lies at or below 0 (no super weight detected:
    inconclusive, no super layer to compare before and after).
    """
    claim(threshold=0.0)
    lm, cand, _ = super_weight(claim, workbench, model)
    ids = workbench.data(model).eval_ids[:INTERPRET_WINDOWS]
    share = interpret.first_token_attention(lm, ids)
    claim.context(windows=int(ids.shape[0]), share_per_layer=[float(v) for v in share.mean(axis=1)])
    claim.figure(
        interpret.plot_attention(share, cand.layer, title=f"{model}: attention on the first token"),
        "first-token attention share per layer (dots: heads; line: head mean); super layer dotted",
    )
    rules.sink_after_super_layer(claim, share, cand.layer)


def test_sensitivity_concentrated_in_heads(claim, workbench, model, metric):
    """The most sensitive attention weights concentrate in a few heads rather than spreading evenly.

    Hypothesis: within attention, the top-k weights of a trained model sit in a few heads (head
    roles; super weights and massive activations are local, not spread over all heads).
    Measurement: the session's global top-(k x tensors) of the metric (the architecture claims'
    selection, one calibration seed; no new scores); its attention entries counted per head slice
    (layer, q/k/v/o projection, head: ``components.per_head``) against each slice's number of weights
    (``components.head_sizes``); heatmap layer x head slice.
    Decision: `rules.heads_concentrated`: the top HEAD_TOP_FRACTION of head slices by density hold
    >= HEAD_CONCENTRATION x their share of the attention weights, and that concentration is beyond
    the null that spreads each (layer, projection)'s entries over its heads in proportion to their
    weights (HEAD_NULL_DRAWS multinomial draws; a busy layer or projection is no head role):
    p < HEAD_P. Some slice's expected
    count < HEAD_MIN_EXPECTED: inconclusive (too few attention entries in the selection).
    Minimum tier: smoke (reuses the session's scores and selection). Trained models only.
    Falsified if: the top slices hold less than HEAD_CONCENTRATION x their weight share, or no more
    than that null gives them (p >= HEAD_P).
    """
    if is_random_init(model):
        pytest.skip(f"{model} is random-init: architecture claims run on trained models only")
    claim(threshold=HEAD_CONCENTRATION)
    lm, names, seed = workbench.model(model), workbench.names(model), workbench.tier.seeds[0]
    k = workbench.tier.topk * len(names)
    frame = workbench.selection(model, metric, seed, mode="global", k=k).to_frame(lm.param_map)
    config = lm.model.config
    counts = components.per_head(frame, lm.param_map, config)
    cells = components.head_sizes(lm.param_map, config, names)
    cells = cells.merge(counts[["layer", "component", "head", "count"]], how="left")
    cells["count"] = cells["count"].fillna(0).astype(int)
    headless = cells["head"] < 0
    cells, no_head = cells[~headless], int(cells.loc[headless, "count"].sum())
    claim.context(model=model, metric=metric, mode="global", k=len(frame), seed=seed)
    claim.measure("attention_entries_without_head", no_head)
    top = cells.sort_values("count", ascending=False, kind="stable").head(5)
    claim.measure("top_head_cells", top[["layer", "component", "head", "count"]].to_dict("records"))
    expected = cells["count"].sum() * cells["weights"] / max(int(cells["weights"].sum()), 1)
    claim.figure(
        plot_head_heatmap(cells, title=f"{model}: global top-{len(frame)} ({metric}) per attention head"),
        "selected attention entries per layer x head slice (q, k, v, o of each head); expected under "
        f"the proportional null {float(expected.mean()):.3g} per slice",
    )
    groups = cells.groupby(["layer", "component"]).ngroup().to_numpy()  # the null keeps their totals
    rules.heads_concentrated(
        claim, cells["count"].to_numpy(), cells["weights"].to_numpy(), HEAD_TOP_FRACTION,
        HEAD_CONCENTRATION, HEAD_P, HEAD_NULL_DRAWS, HEAD_MIN_EXPECTED, seed=seed, groups=groups,
    )  # fmt: skip
