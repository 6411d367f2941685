"""Phase 4 — scaling and architecture: a scale-free sensitivity measure follows a power law in
parameter count (fit on the trained GPT-NeoX family in fixtures/scaling, and on any --esa-model list
of three or more models), and where in the architecture the most sensitive weights sit.

Scaling fits use scale-free quantities only (criteria.SCALING_SCALE_FREE; each claim names its
quantity, ``esa.analyses.scaling.QUANTITIES``). Architecture claims run on trained models only (the
session's --esa-model list and the trained scaling family): where a random-init model's top-k sits is
no research result; those code paths are tested in tests/test_analyze.py."""

import pytest
from criteria import SCALING_PREDICTION, SCALING_R2, SCALING_SCALE_FREE
from rules_scaling import points_fittable

from esa.analyses import components as analyze
from esa.claims.plugin import OPTIONS_KEY
from esa.models.family import family_names
from esa.models.registry import is_random_init

pytestmark = [pytest.mark.phase4, pytest.mark.smoke]


def pytest_generate_tests(metafunc):
    if "series" in metafunc.fixturenames:
        options = metafunc.config.stash[OPTIONS_KEY]
        series = ["scaling-family"] + (["esa-models"] if len(options.models) >= 3 else [])
        metafunc.parametrize("series", series)
    if "measure" in metafunc.fixturenames:
        metafunc.parametrize("measure", SCALING_SCALE_FREE)


_ROWS: dict = {}


def series_rows(series, workbench, esa_options):
    """Per-model measurements of one series (computed once per worker)."""
    from esa.analyses.scaling import measure_family

    if series not in _ROWS:
        names = family_names() if series == "scaling-family" else list(esa_options.models)
        if len(names) < 3:
            pytest.skip(f"{series}: fewer than 3 models (fixtures/scaling missing?)")
        t = workbench.tier
        _ROWS[series] = measure_family(
            names,
            data=str(esa_options.data) if esa_options.data else None,
            max_length=t.max_length,
            max_samples=t.eval_windows,
            n_calib=t.calib_windows,
            seed=t.seeds[0],
            device=workbench.device or "cpu",
        )
    return _ROWS[series]


def _fit(claim, series, measure, workbench, esa_options):
    """Points of one measure, and their power-law fit; ``rules_scaling.points_fittable`` decides
    whether they can have one (non-finite: inconclusive; <= 0: falsified). The claim's context
    names the quantity fitted and the models."""
    from esa.analyses.scaling import QUANTITIES, fit_scaling

    rows = series_rows(series, workbench, esa_options)
    claim.context(quantity=QUANTITIES[measure], models=[r["name"] for r in rows])
    points = [(r["params_non_embedding"], r[measure]) for r in rows]
    claim.measure("points", {r["name"]: [r["params_non_embedding"], r[measure]] for r in rows})
    points_fittable(claim, measure, [y for _, y in points])
    return rows, points, fit_scaling(points, seed=workbench.tier.seeds[0])


def test_scaling_power_law(claim, workbench, esa_options, series, measure):
    """The scale-free sensitivity measure follows a power law in (non-embedding) parameter count.

    Hypothesis: sensitivity concentration changes with model size as value = c · n^α.
    Measurement: the measure (its quantity in the context) on each model of the series, one
    calibration seed; least-squares fit in log-log space with a bootstrap CI of R² over models.
    Decision: R² > 0.8; a non-finite point is inconclusive, a point <= 0 falsifies (no power law).
    Minimum tier: smoke (the family is small; the fit has as many points as models).
    Falsified if: R² <= 0.8, or the measure is <= 0 on some model.
    """
    from esa.analyses.scaling import QUANTITIES, plot_scaling

    claim(threshold=SCALING_R2).context(
        series=series, metric="grad_x_weight", measure=measure, seeds=[workbench.tier.seeds[0]]
    )
    rows, points, fit = _fit(claim, series, measure, workbench, esa_options)
    claim.measure("r2", fit["r2"], ci=fit["r2_ci"], key=True)
    claim.measure("alpha", fit["alpha"])
    claim.measure("alpha_stderr", fit["alpha_stderr"])
    claim.measure("baseline_ppl", {r["name"]: r["baseline_ppl"] for r in rows})
    claim.figure(
        plot_scaling(
            points, fit, labels=[r["name"] for r in rows], ylabel=measure, title=QUANTITIES[measure]
        ),
        f"{measure} ({QUANTITIES[measure]}) vs non-embedding parameters (log-log)",
    )
    claim.expect(fit["r2"], ">", SCALING_R2, name="r2")


def test_scaling_predicts_largest(claim, workbench, esa_options, series, measure):
    """A fit on the smaller models predicts the largest model's measure within 20%.

    Hypothesis: the power law extrapolates (out-of-sample, not just fits).
    Measurement: the fit on all models but the largest, its prediction for the largest.
    Decision: |relative error| <= 0.2; non-finite points inconclusive, points <= 0 falsify.
    Minimum tier: smoke.
    Falsified if: the prediction misses by more than 20%.
    """
    claim(threshold=SCALING_PREDICTION).context(series=series, measure=measure)
    _rows, _, fit = _fit(claim, series, measure, workbench, esa_options)
    err = fit["largest_from_others"]["rel_error"]
    claim.measure("abs_rel_error", abs(err), key=True)
    claim.measure("largest_from_others", fit["largest_from_others"])
    claim.measure("loo_errors", fit["loo_errors"])
    claim.expect(abs(err), "<=", SCALING_PREDICTION, name="abs_rel_error")


def trained_models(esa_options) -> list[str]:
    """The session's models and the trained scaling family, random-init ones left out."""
    names = dict.fromkeys([*esa_options.models, *family_names()])
    return [n for n in names if not is_random_init(n)]


def _profile(workbench, name, metric):
    """Global top-k (k = tier.topk per scored tensor, the per-layer budget) and its tables."""
    lm = workbench.model(name)
    names = workbench.names(name)
    k = workbench.tier.topk * len(names)
    sel = workbench.selection(name, metric, workbench.tier.seeds[0], mode="global", k=k)
    frame = sel.to_frame(lm.param_map)
    table = analyze.component_table(
        frame, lm.param_map, workbench.scores(name, metric, workbench.tier.seeds[0])
    )
    total = sum(lm.param_map[n].numel for n in names)
    param_share = {}
    for n in names:
        group = analyze.group_of(lm.param_map[n].component)
        param_share[group] = param_share.get(group, 0.0) + lm.param_map[n].numel / total
    return lm, frame, table, analyze.group_ratios(table), param_share


def test_mlp_overrepresented(claim, workbench, profiled, metric):
    """MLP weights hold a larger share of the global top-k than of the scored weights.

    Hypothesis: sensitivity concentrates in the MLP of trained models (super weights sit in down
    projections).
    Measurement: the global top-(k x tensors) of the metric, one calibration seed; the MLP's share
    of it and of the scored parameters.
    Decision: share_topk(mlp) > share_params(mlp).
    Minimum tier: smoke.
    Falsified if: the MLP's share of the top-k is at most its share of the parameters.
    """
    if is_random_init(profiled):
        pytest.skip(f"{profiled} is random-init: architecture claims run on trained models only")
    lm, frame, table, ratios, param_share = _profile(workbench, profiled, metric)
    top_mlp, par_mlp = ratios["topk"].get("mlp", 0.0), param_share.get("mlp", 0.0)
    claim(threshold="share_topk(mlp) > share_params(mlp)").context(
        model=profiled, metric=metric, mode="global", k=len(frame)
    )
    claim.measure("mlp_topk_share", top_mlp, key=True)
    claim.measure("mlp_param_share", par_mlp)
    claim.measure("topk_share_by_group", ratios["topk"])
    claim.measure("score_share_by_group", ratios.get("score"))
    heads = analyze.per_head(frame, lm.param_map, lm.model.config)
    claim.measure("top_heads", heads.sort_values("count", ascending=False).head(3).to_dict("records"))
    experts = analyze.per_expert(frame, lm.param_map)
    if len(experts):
        claim.measure("experts", experts.to_dict("records"))
    claim.figure(
        analyze.heatmap(table, "share", f"{profiled}: share of global top-{len(frame)} ({metric})"),
        "layer x component heatmap",
    )
    claim.expect(top_mlp, ">", par_mlp, name="mlp_topk_share")


def test_architectures_compared(claim, workbench, esa_options):
    """In every trained model the MLP holds a larger share of the top-k than attention does.

    Hypothesis: MLP hotspots dominate attention hotspots across trained architectures and sizes.
    Measurement: the global top-k share by group (mlp / attention) of the first metric, on the
    session's models and the trained scaling family (random-init models left out).
    Decision: share(mlp) > share(attention) in every model.
    Minimum tier: smoke.
    Falsified if: attention holds at least the MLP's share in some trained model.
    """
    metric = esa_options.metrics[0]
    names = trained_models(esa_options)
    tables, ratios = {}, {}
    for name in names:
        _, _, table, r, _ = _profile(workbench, name, metric)
        tables[name], ratios[name] = table, r["topk"]
    comparison = analyze.compare_models(tables, by="group")
    failing = [n for n in names if ratios[n].get("mlp", 0.0) <= ratios[n].get("attention", 0.0)]
    claim(threshold="mlp > attention in every model").context(model=names, metric=metric, mode="global")
    claim.measure("models_with_mlp_above_attention", len(names) - len(failing), key=True)
    claim.measure("group_share_by_model", comparison.fillna(0.0).to_dict())
    claim.check(not failing, f"attention >= MLP share in {failing}")
