"""Phase 5 — security: tamper detection from sensitivity maps, and bit flips in the deployed dtype
(vulnerability per bit position; a progressive sensitivity-guided bit search against random flips).

Tamper detection compares the reference model's score map (TAMPER_METRIC, calibration seed s0) with
a suspect's on the same calibration windows; the noise floor of each tensor is the largest shift that
another calibration draw (seed s1) gives the reference (``esa.analyses.tamper``). The suspect is the
model with one planted change (restored bit-exactly afterwards), or an unchanged deep copy.

Bit flips run on the model loaded in FLIP_DTYPE (bf16): flipping the exponent MSB of any weight with
|w| < 2 multiplies it by 2^128, so one random flip there fails the model (the position claim
measures it); the search compares guided and random flips over the other bits.

Decision rules: rules_applications.py (unit tests: test_rules_applications.py)."""

import copy
import dataclasses

import pytest
import rules_applications as rules
from criteria import (
    FLIP_DTYPE,
    FLIP_FAILURE_FACTOR,
    FLIP_POSITION_WEIGHTS,
    FLIP_RANDOM_MAX,
    FLIP_RATIO,
    FLIP_SEARCH_STEPS,
    TAMPER_MARGIN,
    TAMPER_METRIC,
    TAMPER_PLANT,
)

from esa.analyses import bitflip, tamper

pytestmark = [pytest.mark.phase5]
_MEMO: dict = {}
FLIP_REASON = "bf16 evaluations of the whole text (~30-40 per claim; ~2 min at smoke on a CPU core)"


def rescore(workbench, model, lm, seed):
    """``TAMPER_METRIC`` scores of ``lm`` on ``model``'s calibration windows of ``seed``, computed as
    the workbench computes them, never from the score cache (the weights may differ from the file)."""
    from esa.metrics.registry import compute_scores

    t = workbench.tier
    return compute_scores(
        lm,
        TAMPER_METRIC,
        workbench.data(model).calibration(t.calib_windows, seed),
        seed=seed,
        batch_size=t.batch_size,
        hutchinson_samples=t.hutchinson_samples,
        names=workbench.names(model),
        progress=False,
    )


def tamper_context(claim, workbench, model, suspect: str):
    s0, s1 = workbench.tier.seeds[:2]
    claim(threshold=TAMPER_MARGIN).context(
        model=model, metric=TAMPER_METRIC, suspect=suspect, calibration_seed=s0, noise_seed=s1
    )
    return workbench.scores(model, TAMPER_METRIC, s0), workbench.scores(model, TAMPER_METRIC, s1), s0


@pytest.mark.smoke
def test_tamper_planted_change_located(claim, workbench, model):
    """A planted single-weight change shows as the largest sensitivity shift of the model.

    Hypothesis: a modified checkpoint shows up as a sensitivity shift at the modified weight, beyond
    what calibration noise moves, so comparing score maps locates it.
    Measurement: one seeded random non-zero weight of a seeded random scored tensor set to
    TAMPER_PLANT x its tensor's RMS; TAMPER_METRIC scores of the model with and without it on the same
    calibration windows; shifts divided by each tensor's calibration-noise floor (another seed).
    Decision: `rules.planted_found_first`: the planted entry's exceedance > TAMPER_MARGIN, rank 1 of
    all entries, its tensor rank 1 of all tensors.
    Minimum tier: smoke (one scoring pass).
    Falsified if: the planted weight is not detected, or another entry or tensor shifts more.
    """
    ref, noise, s0 = tamper_context(claim, workbench, model, "planted")
    lm = workbench.model(model)
    site = tamper.plant_site(lm, s0, workbench.names(model))
    with tamper.planted(lm, site, TAMPER_PLANT) as plant:
        suspect = rescore(workbench, model, lm, s0)
    claim.context(plant=plant)
    report = tamper.compare_scores(ref, suspect, noise, margin=TAMPER_MARGIN, watch=[site])
    del suspect
    claim.figure(
        tamper.plot_tamper(report, highlight=site[0], title=f"{model}: planted change in {site[0]}"),
        "score shift / calibration-noise floor per tensor (planted tensor in red)",
    )
    rules.planted_found_first(claim, report, f"{site[0]}[{site[1]}]", TAMPER_MARGIN)


@pytest.mark.smoke
def test_tamper_unchanged_copy_clean(claim, workbench, model):
    """An unchanged copy of the model shows no sensitivity shift beyond calibration noise.

    Hypothesis: the comparison raises no false alarm: identical weights scored on the same windows
    differ at most by floating-point noise, far below the calibration-noise floor.
    Measurement: a deep copy of the model scored by TAMPER_METRIC on the same calibration windows;
    shifts against the reference's scores divided by each tensor's calibration-noise floor.
    Decision: `rules.nothing_found`: no entry's exceedance above TAMPER_MARGIN.
    Minimum tier: smoke (one scoring pass).
    Falsified if: any entry of the unchanged copy is detected.
    """
    ref, noise, s0 = tamper_context(claim, workbench, model, "unchanged copy")
    lm = workbench.model(model)
    twin = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    suspect = rescore(workbench, model, twin, s0)
    del twin
    rules.nothing_found(
        claim, tamper.compare_scores(ref, suspect, noise, margin=TAMPER_MARGIN), TAMPER_MARGIN
    )


def deployed(workbench, model):
    """``model`` loaded in FLIP_DTYPE, its baseline PPL and failure PPL (once per worker)."""
    from esa.evaluate import evaluate
    from esa.models import load_model

    if model not in _MEMO:
        lm = load_model(model, dtype=FLIP_DTYPE, device=workbench.device)
        base = evaluate(
            lm.model, workbench.data(model).eval_ids, workbench.tier.batch_size, progress=False
        ).ppl
        _MEMO[model] = (lm, base, bitflip.failure_threshold(base, FLIP_FAILURE_FACTOR))
    return _MEMO[model]


@pytest.mark.min_tier("standard", reason=FLIP_REASON)
def test_flip_vulnerability_by_bit_position(claim, workbench, model, metric, request):
    """In bf16, random single-bit flips fail the model only at the exponent's top bit.

    Hypothesis: the fault literature: a deployed bf16 model's vulnerability is concentrated in the
    exponent MSB (w -> w·2^128 for |w| < 2); elsewhere random flips are tolerated.
    Measurement: per bit position, that bit flipped in the same FLIP_POSITION_WEIGHTS random weights
    (and, reported, in the metric's global top ones): PPL; failure = PPL ≥ 10x baseline or non-finite.
    Decision: `rules.only_position_catastrophic`: random flips fail at the exponent MSB and nowhere else.
    Minimum tier: standard (two evaluations per bit position).
    Falsified if: random flips at the exponent MSB do not fail the model, or they fail it elsewhere.
    """
    from esa.analyses.bitsearch import plot_positions, position_vulnerability
    from esa.perturb import bit_position

    claim(threshold="exponent_msb only").context(
        model=model, metric=metric, dtype=FLIP_DTYPE, weights=FLIP_POSITION_WEIGHTS
    )
    rules.measured_at_min_tier(claim, request.node, workbench.tier)
    lm, base, fail = deployed(workbench, model)
    rows = position_vulnerability(
        lm,
        workbench.data(model),
        FLIP_POSITION_WEIGHTS,
        seed=workbench.tier.seeds[0],
        scores=workbench.scores(model, metric, workbench.tier.seeds[0]),
        failure_ppl=fail,
        batch_size=workbench.tier.batch_size,
    )
    claim.measure("baseline_ppl", base)
    claim.measure("by_bit", rows)
    msb = bit_position("exponent_msb", lm.dtype)
    claim.figure(
        plot_positions(
            rows, baseline_ppl=base, failure_ppl=fail, title=f"{model} {FLIP_DTYPE}: one bit flipped"
        ),
        f"PPL with one bit position flipped in {FLIP_POSITION_WEIGHTS} random / top-{metric} weights",
    )
    failed = {("exponent_msb" if r["bit"] == msb else f"bit {r['bit']}"): r["failed_random"] for r in rows}
    rules.only_position_catastrophic(claim, failed, "exponent_msb")


@pytest.mark.min_tier("standard", reason=FLIP_REASON)
def test_guided_bit_search_beats_random(claim, workbench, model, request):
    """A sensitivity-guided bit search fails the bf16 model with ≥ 10x fewer flips than random flips.

    Hypothesis: the bit-flip attack literature (BFA, Rakin et al. 2019): flips chosen by sensitivity
    break a deployed model with a handful of bits, random flips need orders of magnitude more.
    Measurement: progressive search (gradient at the current weights, the top |w·g| entries per
    tensor, the (entry, bit) of largest first-order loss increase, one flip per step, up to
    FLIP_SEARCH_STEPS) vs uniform random (weight, bit) flips at 1, 2, 4, ..., FLIP_RANDOM_MAX;
    every bit but the exponent MSB allowed in both; failure = PPL ≥ 10x baseline or non-finite.
    Decision: `rules.search_beats_random`: random / guided flips to failure ≥ 10 (a lower bound when
    random never failed: decides only if it alone reaches 10).
    Minimum tier: standard (up to FLIP_SEARCH_STEPS gradient passes and 11 evaluations).
    Falsified if: random flips fail the model within 10x the guided search's flips, or only they do.
    """
    from esa.analyses.bitsearch import bits_except, guided_search, random_search

    claim(threshold=FLIP_RATIO).context(
        model=model, dtype=FLIP_DTYPE, excluded="exponent_msb", metric="grad_x_weight (current weights)"
    )
    rules.measured_at_min_tier(claim, request.node, workbench.tier)
    lm, base, fail = deployed(workbench, model)
    t, data = workbench.tier, workbench.data(model)
    bits = bits_except(lm.dtype, ["exponent_msb"])
    guided = guided_search(
        lm,
        data,
        data.calibration(t.calib_windows, t.seeds[0]),
        bits=bits,
        max_flips=FLIP_SEARCH_STEPS,
        failure_ppl=fail,
        batch_size=t.batch_size,
    )
    random = random_search(
        lm,
        data,
        bits=bits,
        max_flips=FLIP_RANDOM_MAX,
        failure_ppl=fail,
        seed=t.seeds[0],
        batch_size=t.batch_size,
    )
    claim.measure("baseline_ppl", base)
    claim.measure("guided_flips", guided["flips"])
    claim.measure("curves", {"guided": guided["curve"], "random": random["curve"]})
    claim.figure(
        bitflip.plot_flip_curves(
            {"guided": guided["curve"], "random": random["curve"]},
            baseline_ppl=base,
            failure_ppl=fail,
            title=f"{model} {FLIP_DTYPE}: guided vs random bit flips",
        ),
        "PPL vs number of flipped bits (exponent MSB excluded)",
    )
    rules.search_beats_random(
        claim, guided["flips_to_failure"], random["flips_to_failure"], random["max_flips"], FLIP_RATIO
    )
