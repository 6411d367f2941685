"""Tests for esa.analyses.sweep: the scale sweep (factor 1 is the model, 0 removes the weight), the
null of random single weights (distinct, non-zero, never the site, seeded), the magnitude control
(the largest |w| other than the site), restores and plots."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from esa.analyses.sweep import (
    magnitude_control,
    plot_null,
    plot_scale_sweep,
    random_weight_null,
    scale_sweep,
)
from esa.data import make_windows
from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.models import load_model, weights_sha256
from esa.models.tokenizer import builtin_corpus
from esa.perturb import perturbed

SITE = ("model.layers.1.mlp.down_proj.weight", 7 * 176 + 100)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def eval_ids(llama):
    return make_windows(llama.tokenizer, builtin_corpus()[:20000], 32)[:4]


def test_scale_sweep_factor_one_is_the_model_and_zero_removes_the_weight(llama, eval_ids):
    before = weights_sha256(llama.model)
    out = scale_sweep(llama, SITE, eval_ids, (0.0, 1.0, 2.0), batch_size=2)
    base = evaluate(llama.model, eval_ids, 2, progress=False)
    with perturbed(llama.model, {SITE[0]: torch.tensor([SITE[1]])}, "zero"):
        zeroed = evaluate(llama.model, eval_ids, 2, progress=False).ppl
    assert out["ppl"][1] == base.ppl and out["window_nll"][1] == base.window_nll
    assert out["ppl"][0] == zeroed != base.ppl
    assert out["weight"] == float(dict(llama.model.named_parameters())[SITE[0]].detach().reshape(-1)[SITE[1]])
    assert len(out["window_nll"][2]) == eval_ids.shape[0] and json.loads(json.dumps(out)) == out
    assert weights_sha256(llama.model) == before
    with pytest.raises(ConfigError, match="finite and >= 0"):
        scale_sweep(llama, SITE, eval_ids, (-1.0,))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 6))
def test_random_weight_null_draws_distinct_nonzero_others(llama, eval_ids, seed, n):
    values = dict(llama.model.named_parameters())[SITE[0]].detach().reshape(-1)
    out = random_weight_null(llama, SITE, eval_ids[:1], n, seed=seed, batch_size=1)
    assert len(set(out["indices"])) == n == len(out["ppl"]) == len(out["window_nll"])
    assert SITE[1] not in out["indices"] and all(values[i] != 0 for i in out["indices"])
    assert (
        random_weight_null(llama, SITE, eval_ids[:1], n, seed=seed, batch_size=1)["indices"] == out["indices"]
    )
    with pytest.raises(ConfigError, match="lower n"):
        random_weight_null(llama, SITE, eval_ids[:1], values.numel(), seed=seed)


def test_magnitude_control_is_the_largest_other_weights(llama):
    names = llama.param_map.scorable()
    params = dict(llama.model.named_parameters())
    flat = torch.cat([params[n].detach().abs().reshape(-1) for n in names])
    top = torch.topk(flat, 6).values
    offsets = dict(zip(names, torch.tensor([0] + [params[n].numel() for n in names]).cumsum(0).tolist()))
    first = int(torch.argmax(flat))
    name = next(n for n in reversed(names) if offsets[n] <= first)
    sel = magnitude_control(llama, (name, first - offsets[name]), 5)
    chosen_keys = sel.keys()  # a set of (name, flat index)
    assert (name, first - offsets[name]) not in chosen_keys and sel.size == 5
    chosen = sorted((float(params[n].detach().reshape(-1)[i].abs()) for n, i in chosen_keys), reverse=True)
    assert chosen == pytest.approx(top[1:].tolist())


def test_plots_accept_non_finite_values():
    fig = plot_scale_sweep(
        [0, 1, 2], [float("inf"), 0.0, -0.5], [(1.0, 2.0), (0.0, 0.0), (-1.0, 0.1)], failure_delta=9.0
    )
    assert isinstance(fig, Figure)
    assert isinstance(plot_null([0.0, 1e-4, -2e-4, float("nan")], 5.0), Figure)
