"""The claims' workbench on a tiny random-init model: the null of random sets (code paths only)."""

import numpy as np
import pytest

from esa.claims.tiers import get_tier
from esa.claims.workbench import Condition, Workbench


@pytest.fixture(scope="module")
def bench():
    return Workbench(get_tier("smoke"), device="cpu", data="builtin")


def test_random_null_is_one_sample_round_robin_over_the_seeds(bench):
    seeds = bench.tier.seeds
    null = bench.random_null("tiny-llama", "magnitude", "zero", 5)
    assert null.shape == (5,) and np.isfinite(null).all()
    usual = [
        bench.perturbed_eval("tiny-llama", Condition("magnitude", s, "random", "zero"))["delta_ppl"]
        for s in seeds
    ]
    assert null[: len(seeds)].tolist() == usual  # the seeds' usual controls come first
    second = bench.perturbed_eval("tiny-llama", Condition("magnitude", seeds[0], "random", "zero", draw=1))
    assert null[len(seeds)] == second["delta_ppl"]


def test_random_sets_do_not_depend_on_the_calibration_scores(bench):
    """Why one null serves every seed: the same selection seed gives the same random set whatever
    the scores it is drawn beside."""
    a = bench.selection("tiny-llama", "grad_x_weight", 0, "random", draw=1)
    b = bench.selection("tiny-llama", "magnitude", 0, "random", draw=1)
    assert a.size > 0 and a.keys() == b.keys()
