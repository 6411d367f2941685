"""Unit tests of the zero-shot decision rule (rules_zeroshot.py) on synthetic accuracies: it holds,
is falsified and is inconclusive where it must, and enough items decide what a few cannot. Not
claims: no model, no ``claim`` fixture."""

import pytest
import rules_zeroshot as rules
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive

POINTS, LEVEL = 10.0, 0.95
HOLDS, FALSIFIED, INCONCLUSIVE = "holds", "falsified", "inconclusive"


def verdict(acc_random: float, acc_super: float, n: int) -> tuple[str, Claim]:
    """The rule's verdict on n items at the given accuracies (counts rounded)."""
    claim = Claim("synthetic")
    try:
        rules.accuracy_drop(claim, round(acc_random * n), round(acc_super * n), n, POINTS, LEVEL)
    except ClaimFalsified:
        return FALSIFIED, claim
    except ClaimInconclusive:
        return INCONCLUSIVE, claim
    assert claim.checks[-1]["ok"] is True
    return HOLDS, claim


@pytest.mark.parametrize(
    ("acc_random", "acc_super", "n", "expected"),
    [
        (0.60, 0.30, 2000, HOLDS),  # a 30-point drop on enough items
        (0.60, 0.30, 42, INCONCLUSIVE),  # the same drop on the fixtures' 42 items: CI too wide
        (0.60, 0.59, 2000, FALSIFIED),  # no drop, resolved
        (0.60, 0.62, 2000, FALSIFIED),  # super set better than random
        (0.60, 0.51, 2000, INCONCLUSIVE),  # 9 points: below 10 but the CI reaches it
        (0.60, 0.60, 0, INCONCLUSIVE),  # no items
    ],
)
def test_accuracy_drop(acc_random, acc_super, n, expected):
    out, claim = verdict(acc_random, acc_super, n)
    assert out == expected
    if n:
        assert claim.key == "accuracy_drop_points"


def run(rule, *args) -> str:
    try:
        rule(Claim("synthetic"), *args)
    except ClaimInconclusive:
        return INCONCLUSIVE
    return HOLDS


@pytest.mark.parametrize(
    ("n", "expected"), [(0, INCONCLUSIVE), (42, INCONCLUSIVE), (60, HOLDS), (1000, HOLDS)]
)
def test_resolvable(n, expected):
    """42 items (the fixtures) can never resolve 10 points; from about 51 items on they might."""
    assert run(rules.resolvable, n, POINTS, LEVEL) == expected


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), a=st.floats(0, 1), b=st.floats(0, 1))
def test_min_half_width_is_a_lower_bound(n, a, b):
    """No pair of accuracies on n items gives a narrower CI than ``min_half_width(n)``."""
    _, low, high = rules.drop_ci(round(a * n), round(b * n), n, LEVEL)
    assert (high - low) / 2 >= rules.min_half_width(n, LEVEL) - 1e-9


def test_more_items_decide_what_few_cannot():
    """One effect (random 0.6, super 0.3): inconclusive at 12-100 items, holds from ~1000 on."""
    assert [verdict(0.6, 0.3, n)[0] for n in (12, 50, 100)] == [INCONCLUSIVE] * 3
    assert [verdict(0.6, 0.3, n)[0] for n in (1000, 5000)] == [HOLDS] * 2


def test_drop_ci_at_a_boundary_count():
    """k_super = 0 (Wilson upper bound > 0): the CI still contains the drop and is not degenerate."""
    d, low, high = rules.drop_ci(30, 0, 100, LEVEL)
    assert d == pytest.approx(30.0)
    assert low < d < high


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), a=st.floats(0, 1), b=st.floats(0, 1))
def test_drop_ci_properties(n, a, b):
    """The point lies in its CI, the CI has positive width and stays within ±100 points."""
    k_r, k_s = round(a * n), round(b * n)
    d, low, high = rules.drop_ci(k_r, k_s, n, LEVEL)
    assert low <= d <= high and high - low > 0
    assert low >= -100 and high <= 100


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 200))
def test_small_samples_never_decide_an_equal_split(n):
    """Equal accuracies on ≤ 200 items: the CI half-width exceeds 5 points: inconclusive."""
    assert verdict(0.5, 0.5, n)[0] == INCONCLUSIVE
