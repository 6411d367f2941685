"""The claims' workbench on a tiny random-init model: the null of random sets (code paths only)."""

import numpy as np
import pytest

from esa.claims.shared import SharedResults
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


@pytest.mark.parametrize(("sets", "budget_sets", "kept"), [(3, 10, 3), (3, 1.5, 1), (4, 2, 2), (2, 0.5, 1)])
def test_score_sets_kept_within_their_byte_budget(tmp_path, monkeypatch, sets, budget_sets, kept):
    """Whole score sets are as large as the model: the workbench keeps at most ``keep_score_bytes``
    of them (the most recent; always the one just asked for), and makes room before computing."""
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    wb = Workbench(get_tier("smoke"), device="cpu", data="builtin", keep_scores=3)
    one = sum(t.numel() * t.element_size() for t in wb.scores("tiny-llama", "magnitude", 0).values())
    wb.keep_score_bytes = int(budget_sets * one)
    wb._scores.clear()
    for seed in range(sets):
        got = wb.scores("tiny-llama", "magnitude", seed)
        assert next(reversed(wb._scores.values())) is got
    assert len(wb._scores) == min(kept, 3)
    assert [k[2] for k in wb._scores] == list(range(sets))[-len(wb._scores) :]


def test_xdist_workers_share_each_measurement(tmp_path, monkeypatch):
    """Two workbenches on one shared directory (two xdist workers): the second reads what the first
    measured, with the same numbers, and evaluates nothing itself; the selections of perturbations
    that change the same entries are one."""
    import esa.evaluate

    root = tmp_path / "shared"
    root.mkdir()
    first, second = (
        Workbench(get_tier("smoke"), device="cpu", data="builtin", shared=SharedResults(root))
        for _ in range(2)
    )
    cond = Condition("magnitude", 0, "bottom", "zero")
    measured = first.perturbed_eval("tiny-llama", cond)
    base = first.baseline("tiny-llama")
    calls = []
    monkeypatch.setattr(esa.evaluate, "evaluate", lambda *a, **k: calls.append(a) or pytest.fail("evaluated"))
    assert second.perturbed_eval("tiny-llama", cond) == measured
    assert second.baseline("tiny-llama") == base and not calls
    bottoms = [
        first.selection("tiny-llama", "magnitude", 0, "bottom", perturbation=p) for p in ("zero", "sign_flip")
    ]
    assert bottoms[0] is bottoms[1]
