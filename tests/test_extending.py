"""The runnable examples of docs/EXTENDING.md work as written: the metric and the perturbation
are registered from the guide's own code blocks, used, and unregistered again."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from esa.data import prepare_data
from esa.metrics.gradient import gradient_pass
from esa.metrics.registry import METRICS, ScoreContext, compute_scores, register_metric
from esa.models import load_model
from esa.perturb import PERTURBATIONS, perturbed, register_perturbation

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md"
BLOCKS = [
    textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
]


def _block(registers: str) -> str:
    found = [b for b in BLOCKS if registers in b]
    assert len(found) == 1, f"docs/EXTENDING.md should hold one block with {registers!r}"
    return found[0]


@pytest.fixture()
def registered():
    """Runs guide blocks in a namespace of esa's registries; drops what they registered after."""
    before = set(METRICS), set(PERTURBATIONS)
    namespace = dict(
        register_metric=register_metric,
        ScoreContext=ScoreContext,
        gradient_pass=gradient_pass,
        register_perturbation=register_perturbation,
    )
    yield lambda code: exec(compile(code, str(GUIDE), "exec"), namespace)
    for name in set(METRICS) - before[0]:
        del METRICS[name]
    for name in set(PERTURBATIONS) - before[1]:
        del PERTURBATIONS[name]


def test_guide_metric_is_the_absolute_gradient(registered):
    registered(_block('@register_metric("grad_abs"'))
    lm = load_model("tiny-llama")
    calib = prepare_data(lm.tokenizer, None, max_length=16, max_samples=2).calibration(2, seed=0)
    scores = compute_scores(lm, "grad_abs", calib, batch_size=2, progress=False)
    signed = compute_scores(lm, "grad_x_weight", calib, batch_size=2, progress=False)  # |w g|
    named = dict(lm.model.named_parameters())
    for name, s in scores.items():
        w = named[name].detach().abs()
        torch.testing.assert_close(s * w, signed[name], rtol=1e-5, atol=1e-7)


def test_guide_perturbation_halves_and_restores(registered):
    registered(_block('@register_perturbation("half"'))
    w = torch.randn(4, 6)
    original = w.clone()
    with perturbed({"w": w}, {"w": torch.tensor([0, 7, 23])}, "half"):
        assert w.view(-1)[7] == original.view(-1)[7] * 0.5
        assert torch.equal(w.view(-1)[1:7], original.view(-1)[1:7])
    assert torch.equal(w, original)
