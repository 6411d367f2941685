"""Unit tests of the decision rules of the runner-analysis claims (rules_analyses.py) on synthetic
measurements: for every rule a case where it must hold, one where it must be falsified and one
where it must be inconclusive, plus hypothesis properties. Not claims: no model, no ``claim``
fixture.

Progressive curves are lists of {"n_weights", "reached"} on the doubling grid, stopping at the
first count that reached the target (as ``esa.analyses.progressive`` records them).
"""

import math

import numpy as np
import pandas as pd
import pytest
import rules_analyses as rules
from hypothesis import given, settings
from hypothesis import strategies as st
from verdicts import FALSIFIED, HOLDS, INCONCLUSIVE, verdict

FAST = settings(max_examples=50, deadline=None)


def curve(reached_at: int | None, cap: int = 4096) -> list[dict]:
    """Doubling grid 1, 2, 4, ... < cap, then cap, stopping at the first count ≥ ``reached_at``."""
    grid = [*(2**i for i in range(cap.bit_length()) if 2**i < cap), cap]
    out = []
    for n in grid:
        hit = reached_at is not None and n >= reached_at
        out.append({"n_weights": n, "reached": hit, "ppl": 50.0 if hit else 21.0})
        if hit:
            break
    return out


# --- needed_interval ------------------------------------------------------------------------------
def test_needed_interval():
    assert rules.needed_interval(curve(1)) == (1.0, 1.0)
    assert rules.needed_interval(curve(5)) == (5.0, 8.0)  # missed at 4, reached at 8
    assert rules.needed_interval(curve(None, cap=10)) == (11.0, math.inf)  # grid 1, 2, 4, 8, 10
    assert rules.needed_interval([]) == (1.0, math.inf)


# --- fewer_weights_needed: critical reach the target with >= N x fewer weights --------------------
@pytest.mark.parametrize(
    ("critical", "random", "cap", "expected"),
    [
        (1, 32, 4096, HOLDS),  # random missed at 16: ratio ≥ 17
        (1, None, 10, HOLDS),  # random never reached within 10: ratio ≥ 11
        (2, 64, 4096, HOLDS),  # critical ≤ 2, random > 32: ratio ≥ 16.5
        (1, 4, 4096, FALSIFIED),  # random ≤ 4 while critical = 1: ratio ≤ 4
        (64, 128, 4096, FALSIFIED),  # ratio in [65/64, 128/33]
        (None, 256, 4096, FALSIFIED),  # critical never reached, random did
        (None, None, 4096, INCONCLUSIVE),  # neither reached the target
        (4, None, 16, INCONCLUSIVE),  # random cap too small: ratio ≥ 17/4 only
        (8, 64, 4096, INCONCLUSIVE),  # ratio in [33/8, 64/5]: the grid cannot tell
    ],
)
def test_fewer_weights_needed(critical, random, cap, expected):
    out, claim = verdict(rules.fewer_weights_needed, curve(critical), curve(random, cap), 10.0)
    assert out == expected
    assert claim.key == "random_over_critical"


def test_fewer_weights_needed_key_value():
    _, claim = verdict(rules.fewer_weights_needed, curve(1), curve(32), 10.0)
    assert claim.measured["random_over_critical"]["value"] == 32.0
    assert claim.measured["random_over_critical"]["ci"] == [17.0, 32.0]
    assert claim.measured["weights_needed"]["value"] == {"critical": 1, "random": 32}
    _, claim = verdict(rules.fewer_weights_needed, curve(1), curve(None, 10), 10.0)
    assert claim.measured["random_over_critical"]["value"] == 11.0  # the lower bound decided


GRID = st.sampled_from([None, *(2**i for i in range(13))])


@FAST
@given(critical=GRID, random=GRID, factor=st.floats(1.01, 100.0))
def test_fewer_weights_needed_bounds(critical, random, factor):
    """Holds only when random provably needs ≥ factor x as many; random reaching no later than
    critical never holds; a smaller factor never turns holds into anything else."""
    out, claim = verdict(rules.fewer_weights_needed, curve(critical), curve(random), factor)
    lower, upper = claim.measured["random_over_critical"]["ci"]
    assert lower <= upper
    if out == HOLDS:
        assert lower >= factor
        assert verdict(rules.fewer_weights_needed, curve(critical), curve(random), factor / 2)[0] == HOLDS
    if random is not None and (critical is None or random <= critical):
        assert out != HOLDS
    if out == FALSIFIED:
        assert upper < factor


# --- dominant_share ---------------------------------------------------------------------------------
def test_dominant_share():
    frame = pd.DataFrame({"tensor": ["a"] * 4 + ["b"] * 2, "col": [3, 3, 3, 7, 1, 2]})
    assert rules.dominant_share(frame) == {"a": 0.75, "b": 0.5}
    assert rules.dominant_share(frame.rename(columns={"col": "row"}), "row") == {"a": 0.75, "b": 0.5}


# --- concentrated_vs_random: top-k share in its most common column vs a random set's ----------------
T = 30
RNG = np.random.default_rng(0)
RANDOM_SHARE = {f"t{i}": float(v) for i, v in enumerate(RNG.uniform(0.02, 0.04, T))}


def shares(level: float, spread: float = 0.05) -> dict[str, float]:
    return {f"t{i}": float(np.clip(level + spread * RNG.standard_normal(), 0.01, 1.0)) for i in range(T)}


def test_concentrated_vs_random():
    out, claim = verdict(rules.concentrated_vs_random, shares(0.4), RANDOM_SHARE, 3.0)
    assert out == HOLDS and claim.key == "share_ratio_top_random"
    assert verdict(rules.concentrated_vs_random, shares(0.035, 0.005), RANDOM_SHARE, 3.0)[0] == FALSIFIED
    straddling = {t: (1.0 if i < 3 else 0.03) for i, t in enumerate(RANDOM_SHARE)}  # R ≈ 4, wide CI
    assert verdict(rules.concentrated_vs_random, straddling, RANDOM_SHARE, 3.0)[0] == INCONCLUSIVE


def test_concentrated_vs_random_inconclusive_without_tensors():
    assert verdict(rules.concentrated_vs_random, {"a": 0.5}, {"b": 0.02}, 3.0)[0] == INCONCLUSIVE
    nan = {**RANDOM_SHARE, "t0": math.nan}
    assert verdict(rules.concentrated_vs_random, shares(0.4), nan, 3.0)[0] == INCONCLUSIVE


@FAST
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=40), st.floats(1.01, 10.0))
def test_a_set_against_itself_is_never_concentrated(values, factor):
    """R = 1 exactly when the top-k is spread like the random set: falsified for any factor > 1."""
    same = {f"t{i}": v for i, v in enumerate(values)}
    assert verdict(rules.concentrated_vs_random, same, same, factor)[0] == FALSIFIED


# --- stable_across_conditions: top-k Jaccard across two conditions -----------------------------------
def counts(inter: float, k: int = 100, tensors: int = 20, spread: int = 3) -> np.ndarray:
    """[T, 3] per tensor: |A∩B| around ``inter`` x k, |A| = |B| = k."""
    base = np.clip(np.round(inter * k + RNG.integers(-spread, spread + 1, tensors)), 0, k)
    return np.column_stack([base, np.full(tensors, k), np.full(tensors, k)])


def test_stable_across_conditions():
    out, claim = verdict(rules.stable_across_conditions, counts(0.9), 0.3, 0.8)
    assert out == HOLDS and claim.key == "jaccard"
    assert verdict(rules.stable_across_conditions, counts(0.2), 0.3, 0.8)[0] == FALSIFIED
    halves = np.vstack([counts(0.9, tensors=10, spread=0), counts(0.0, tensors=10, spread=0)])
    assert (
        verdict(rules.stable_across_conditions, halves, 0.3, 0.8)[0] == INCONCLUSIVE
    )  # J ≈ 0.29, CI straddles 0.3


def test_stable_across_conditions_inconclusive_without_difference():
    """Bit-identical scores compare nothing (Jaccard 1 by construction); NaN decides nothing."""
    assert verdict(rules.stable_across_conditions, counts(1.0, spread=0), 0.3, 0.0)[0] == INCONCLUSIVE
    assert verdict(rules.stable_across_conditions, counts(0.9), 0.3, math.nan)[0] == INCONCLUSIVE


@FAST
@given(st.lists(st.integers(1, 100), min_size=2, max_size=30), st.floats(0.01, 0.99))
def test_disjoint_sets_are_never_stable(sizes, threshold):
    disjoint = np.column_stack([np.zeros(len(sizes)), sizes, sizes])
    assert verdict(rules.stable_across_conditions, disjoint, threshold, 0.5)[0] == FALSIFIED
