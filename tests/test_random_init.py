"""Code-path tests on the random-init tiny architectures (moved from the claim suite, issue 11: a
random-init model's sensitivity is no research result, but every architecture must run).

- an untrained model predicts close to uniformly: PPL within [V/2, 2V] on the built-in text (the
  logits of a random init are small, so every token costs about log V nats);
- every registered perturbation of the grad_x_weight top-k is undone bit-exactly on every
  architecture (dense, MoE with fused experts, fused projections): the weights' sha256 and the
  perplexity after restoring equal the unperturbed ones exactly.
"""

from __future__ import annotations

import math

import pytest

from esa.data import prepare_data
from esa.evaluate import evaluate
from esa.metrics.registry import compute_scores
from esa.models import load_model, weights_sha256
from esa.models.tiny import tiny_models
from esa.perturb import PERTURBATIONS, bit_position, perturbed, resolve_prob, resolve_scale
from esa.select import select

ARCHS = tiny_models()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    lm = load_model(request.param, device="cpu")
    data = prepare_data(lm.tokenizer, "builtin", None, max_length=32, max_samples=4)
    scores = compute_scores(lm, "grad_x_weight", data.calibration(1, 0), progress=False)
    base = evaluate(lm.model, data.eval_ids, 4, progress=False).ppl
    return lm, data, select(scores, 4, "top", "per_layer", seed=0, metric="grad_x_weight"), base


def test_untrained_model_predicts_near_uniformly(tiny):
    lm, _, _, ppl = tiny
    vocab = lm.model.config.vocab_size
    assert vocab / 2 <= ppl <= 2 * vocab, f"{lm.name}: PPL {ppl:.1f} vs vocabulary {vocab}"


@pytest.mark.parametrize("method", sorted(PERTURBATIONS))
def test_every_perturbation_restores_bit_exactly(tiny, method):
    lm, data, sel, base = tiny
    before = weights_sha256(lm.model)
    spec = PERTURBATIONS[method]
    bit = bit_position(None, next(lm.model.parameters()).dtype) if spec.uses_bit else None
    options = {"scale": resolve_scale(method, None), "prob": resolve_prob(method, None), "bit": bit}
    with perturbed(lm.model, sel, method, **options) as info:
        evaluate(lm.model, data.eval_ids, 4, progress=False)
    assert info.verified
    assert weights_sha256(lm.model) == before
    assert math.isfinite(base)
    assert evaluate(lm.model, data.eval_ids, 4, progress=False).ppl == base  # bit-exact
