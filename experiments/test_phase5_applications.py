"""Phase 5 — applications: the super-weight detector (Yu et al. 2024) and its controls,
sensitivity-guided pruning vs magnitude and Wanda, and bit-flip fault tolerance."""

import math

import pytest
from criteria import (
    ACTIVATION_RECOVERY,
    FLIP_FAILURE_FACTOR,
    FLIP_RATIO,
    PRUNE_GAIN,
    PRUNE_METHODS,
    PRUNE_SPARSITY,
    RANK_METRICS,
    SUPER_WEIGHT_VS_RANDOM,
)

from esa import plots
from esa.evaluate import evaluate
from esa.perturb import perturbed

pytestmark = [pytest.mark.phase5]
smoke = pytest.mark.smoke
_MEMO: dict = {}


def detection(workbench, model, tasks):
    """Detector report, top candidate and the zeroing measurements (once per worker)."""
    from esa.analyses.detect import candidate_selection, detect_super_weights, random_weight_selection
    from esa.analyses.zeroshot import evaluate_task

    if model not in _MEMO:
        lm, data = workbench.model(model), workbench.data(model)
        report = detect_super_weights(lm)
        out = {"report": report, "candidate": None}
        if report.candidates:
            cand = max(report.candidates, key=lambda c: abs(c.output_activation))
            only = candidate_selection([cand], report.shapes)
            rand = random_weight_selection(lm, [cand], seed=workbench.tier.seeds[0])
            base = workbench.baseline(model)
            with perturbed(lm.model, only, "zero"):
                zeroed = evaluate(lm.model, data.eval_ids, workbench.tier.batch_size, progress=False)
                zs_zeroed = {t: evaluate_task(lm, ex, progress=False)["acc"] for t, ex in tasks.items()}
            with perturbed(lm.model, rand, "zero"):
                random = evaluate(lm.model, data.eval_ids, workbench.tier.batch_size, progress=False)
            zs_base = {t: r["acc"] for t, r in workbench.zeroshot(model, tasks).items()}
            out.update(
                candidate=cand,
                ppl_baseline=base.ppl,
                ppl_zeroed=zeroed.ppl,
                ppl_random=random.ppl,
                zeroshot_baseline=zs_base,
                zeroshot_zeroed=zs_zeroed,
            )
        _MEMO[model] = out
    return _MEMO[model]


def _damage(ppl, base):
    return ppl - base if math.isfinite(ppl) else math.inf


@smoke
def test_super_weight_detected_and_critical(claim, workbench, model, zeroshot_examples):
    """The detector finds a super weight in a down projection whose zeroing raises PPL at least
    3x more than zeroing a random weight of the same tensor."""
    det = detection(workbench, model, zeroshot_examples)
    report = det["report"]
    claim(threshold=SUPER_WEIGHT_VS_RANDOM).context(
        model=model, prompt=report.prompt, spike_threshold=report.threshold
    )
    claim.measure("spike_layers", report.spike_layers)
    claim.measure(
        "candidates",
        [
            {
                k: getattr(c, k)
                for k in (
                    "layer",
                    "param_name",
                    "row",
                    "col",
                    "expert",
                    "weight",
                    "input_activation",
                    "output_activation",
                )
            }
            for c in report.candidates
        ],
    )
    claim.check(det["candidate"] is not None, "no activation spike: the detector found no super weight")
    c = det["candidate"]
    d_sw, d_rand = (
        _damage(det["ppl_zeroed"], det["ppl_baseline"]),
        _damage(det["ppl_random"], det["ppl_baseline"]),
    )
    claim.measure("super_weight", f"{c.param_name}[{c.row}, {c.col}]", key=True)
    claim.measure("ppl_baseline", det["ppl_baseline"])
    claim.measure("ppl_zero_super_weight", det["ppl_zeroed"])
    claim.measure("ppl_zero_random_weight", det["ppl_random"])
    from esa.analyses.detect import rank_under_metric

    seed = workbench.tier.seeds[0]
    claim.measure(
        "rank_under_metric",
        {
            m: rank_under_metric(workbench.scores(model, m, seed), c.param_name, c.flat_index)
            for m in RANK_METRICS
        },
    )
    claim.measure("zeroshot_acc_baseline", det["zeroshot_baseline"])
    claim.measure("zeroshot_acc_zero_super_weight", det["zeroshot_zeroed"])
    claim.check(
        d_sw > 0
        and not (math.isinf(d_sw) and math.isinf(d_rand))
        and d_sw >= SUPER_WEIGHT_VS_RANDOM * max(d_rand, 0.0),
        f"ΔPPL zero super weight {d_sw:.4g} < {SUPER_WEIGHT_VS_RANDOM} x ΔPPL zero random weight {d_rand:.4g}",
    )


@smoke
def test_super_activation_restore_recovers(claim, workbench, model, zeroshot_examples):
    """Zeroing the super weight but restoring its super activation recovers at least half of the
    damage (in mean NLL)."""
    from esa.analyses.detect import super_activation_control

    det = detection(workbench, model, zeroshot_examples)
    claim(threshold=ACTIVATION_RECOVERY).context(model=model, positions="spike")
    claim.check(det["candidate"] is not None, "no super weight detected")
    res = super_activation_control(
        workbench.model(model),
        det["candidate"],
        workbench.data(model).eval_ids,
        positions="spike",
        batch_size=workbench.tier.batch_size,
    )
    damage = res.nll_zeroed - res.nll_baseline
    recovery = (res.nll_zeroed - res.nll_restored) / damage if damage > 0 else math.nan
    claim.measure("recovery", recovery, key=True)
    claim.measure(
        "ppl", {"baseline": res.ppl_baseline, "zeroed": res.ppl_zeroed, "restored": res.ppl_restored}
    )
    claim.measure("positions_restored", res.n_restored)
    claim.check(damage > 0, f"zeroing did not raise the NLL ({damage:.4g})")
    claim.expect(recovery, ">=", ACTIVATION_RECOVERY, name="recovery")


@smoke
def test_super_weight_ranked_by_metric(claim, workbench, model, metric, zeroshot_examples):
    """The detected super weight is within the metric's global top-k."""
    from esa.analyses.detect import rank_under_metric

    det = detection(workbench, model, zeroshot_examples)
    k = workbench.tier.topk
    claim(threshold=k).context(model=model, metric=metric, seeds=[workbench.tier.seeds[0]], mode="global")
    claim.check(det["candidate"] is not None, "no super weight detected")
    c = det["candidate"]
    rank = rank_under_metric(
        workbench.scores(model, metric, workbench.tier.seeds[0]), c.param_name, c.flat_index
    )
    claim.measure("rank", rank, key=True)
    claim.expect(rank, "<=", k, name="rank")


@smoke
def test_pruning_beats_magnitude(claim, workbench, model):
    """At 50% unstructured sparsity the best sensitivity-guided pruning beats magnitude pruning by
    more than 15% in perplexity (reported beside Wanda = act_mag per output row)."""
    from esa.analyses.prune import compare_at, pruning_table

    seed = workbench.tier.seeds[0]
    scores = {m: workbench.scores(model, m, seed) for m in dict.fromkeys(m for m, _ in PRUNE_METHODS)}
    table = pruning_table(
        workbench.model(model),
        workbench.data(model),
        methods=PRUNE_METHODS,
        sparsities=(0.1, 0.2, 0.3, 0.5),
        scores=scores,
        eval_batch_size=workbench.tier.batch_size,
        progress=False,
    )
    cmp = compare_at(table, PRUNE_SPARSITY)
    gain = cmp["improvement_vs_magnitude"]
    claim(threshold=PRUNE_GAIN).context(
        model=model, seeds=[seed], sparsity=PRUNE_SPARSITY, methods=[f"{m}/{g}" for m, g in PRUNE_METHODS]
    )
    claim.measure("improvement_vs_magnitude", gain, key=True)
    claim.measure("improvement_vs_wanda", cmp["improvement_vs_wanda"])
    claim.measure("best", cmp["best"])
    claim.measure("dense_ppl", cmp["dense_ppl"])
    claim.measure("table", table[["metric", "granularity", "sparsity", "ppl"]].to_dict("records"))
    series = {
        f"{m}/{g}": table[(table.metric == m) & (table.granularity == g)]
        .sort_values("sparsity")["ppl"]
        .tolist()
        for m, g in PRUNE_METHODS
    }
    fig = plots.plot_dose_response([0.1, 0.2, 0.3, 0.5], series, f"pruning: PPL vs sparsity ({model})")
    claim.figure(fig, "PPL after unstructured pruning by each method")
    claim.check(gain is not None and math.isfinite(gain), f"no comparison possible: {cmp}")
    claim.expect(gain, ">", PRUNE_GAIN, name="improvement_vs_magnitude")


def _flip_claim(claim, workbench, model, metric, lm, position="exponent_msb"):
    from esa.analyses.bitflip import flip_comparison, plot_flip_curves

    out = flip_comparison(
        lm,
        workbench.data(model),
        workbench.scores(model, metric, workbench.tier.seeds[0]),
        bit=position,
        seed=workbench.tier.seeds[0],
        failure_factor=FLIP_FAILURE_FACTOR,
        batch_size=workbench.tier.batch_size,
        metric=metric,
        progress=False,
    )
    cvr = out["critical_vs_random"]
    claim.measure("ratio", cvr["ratio"], key=True)
    claim.measure("ratio_text", cvr["text"])
    claim.measure("flips_to_failure", out["flips_to_failure"])
    claim.measure("baseline_ppl", out["baseline_ppl"])
    claim.measure("curves", {k: [[p["n_flips"], p["ppl"]] for p in c] for k, c in out["curves"].items()})
    claim.figure(
        plot_flip_curves(
            out["curves"],
            baseline_ppl=out["baseline_ppl"],
            failure_ppl=out["failure_ppl"],
            title=f"{position} flips ({model}, {lm.dtype})",
        ),
        "PPL vs number of bit flips",
    )
    claim.check(cvr["ratio"] is not None, cvr["text"])
    claim.expect(cvr["ratio"], ">=", FLIP_RATIO, name="ratio")


@smoke
def test_critical_weights_fail_with_fewer_flips(claim, workbench, model, metric):
    """Flipping the exponent's top bit, the metric's top weights fail the model (PPL >= 10x
    baseline or non-finite) with at least 10x fewer flips than random weights (fp32)."""
    claim(threshold=FLIP_RATIO).context(model=model, metric=metric, bit="exponent_msb", dtype="fp32")
    _flip_claim(claim, workbench, model, metric, workbench.model(model))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("position", ["sign", "exponent_msb", "mantissa"])
def test_flip_tolerance_by_position_and_dtype(claim, workbench, model, metric, dtype, position):
    """Per bit position and dtype: the metric's top weights fail the model with at least 10x
    fewer flips than random weights."""
    from esa.models import load_model

    claim(threshold=FLIP_RATIO).context(model=model, metric=metric, bit=position, dtype=dtype)
    lm = load_model(model, dtype=dtype, device=workbench.device)
    _flip_claim(claim, workbench, model, metric, lm, position)
