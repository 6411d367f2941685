"""Unit tests of the phase-4 scaling decision rule (experiments/rules_scaling.py)."""

import math

import pytest
import rules_scaling as rules
from hypothesis import given
from hypothesis import strategies as hs

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive


@given(hs.lists(hs.floats(1e-9, 1e9), min_size=3, max_size=8))
def test_positive_finite_points_hold(values):
    claim = Claim()
    rules.points_fittable(claim, "concentration", values)
    assert claim.checks and all(c["ok"] for c in claim.checks)


@pytest.mark.parametrize("bad", [0.0, -3.0])
def test_non_positive_point_is_falsified(bad):
    with pytest.raises(ClaimFalsified, match="not positive"):
        rules.points_fittable(Claim(), "super_random_ratio", [11.9, 23.3, bad, 67.7])


@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_non_finite_point_is_inconclusive(bad):
    with pytest.raises(ClaimInconclusive, match="not finite"):
        rules.points_fittable(Claim(), "super_random_ratio", [11.9, 23.3, 7.3, bad, 67.7])
