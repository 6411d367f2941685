"""Unit tests of the pruning decision rule (rules_prune.py) on synthetic pruning tables: where it
must hold, be falsified and be inconclusive. Not claims: no model, no ``claim`` fixture."""

import math

import pandas as pd
import pytest
import rules_prune

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive

COLS = ["metric", "granularity", "sparsity", "pattern", "ppl", "dense_ppl", "ratio"]
GAIN = 0.15


def table(magnitude: float, best: float, wanda: float = 30.0, pattern: str = "unstructured"):
    rows = [
        ("magnitude", "layer", 0.5, pattern, magnitude),
        ("act_mag", "row", 0.5, pattern, wanda),
        ("grad_x_weight", "row", 0.5, pattern, best),
        ("hutchinson_diag", "row", 0.5, pattern, best * 3),
    ]
    return pd.DataFrame([(*r, 10.0, r[-1] / 10.0) for r in rows], columns=COLS)


def verdict(frame, sparsity=0.5) -> tuple[str, Claim]:
    claim = Claim("synthetic")
    try:
        rules_prune.beats_magnitude(claim, frame, sparsity, GAIN)
    except ClaimFalsified:
        return "falsified", claim
    except ClaimInconclusive:
        return "inconclusive", claim
    return "holds", claim


def test_holds_when_best_is_clearly_better():
    v, claim = verdict(table(magnitude=100.0, best=50.0))
    assert v == "holds"
    assert claim.measured["improvement_vs_magnitude"]["value"] == pytest.approx(0.5)
    assert claim.measured["best"]["value"]["metric"] == "grad_x_weight"
    assert claim.key == "improvement_vs_magnitude"


@pytest.mark.parametrize("best", [90.0, 100.0, 200.0, math.inf, math.nan])
def test_falsified_when_not_better_by_the_gain_or_broken(best):
    assert verdict(table(magnitude=100.0, best=best))[0] == "falsified"


def test_holds_against_an_infinite_magnitude_ppl():
    assert verdict(table(magnitude=math.inf, best=50.0))[0] == "holds"


def test_inconclusive_without_a_sensitivity_method_or_magnitude():
    frame = table(magnitude=100.0, best=50.0)
    assert verdict(frame[frame.metric.isin(["magnitude", "act_mag"])])[0] == "inconclusive"
    assert verdict(frame[frame.metric != "magnitude"])[0] == "inconclusive"


def test_pattern_selects_its_rows():
    frame = pd.concat([table(100.0, 50.0), table(100.0, 95.0, pattern="2:4")], ignore_index=True)
    assert verdict(frame, 0.5)[0] == "holds"
    assert verdict(frame, "2:4")[0] == "falsified"
