"""Parametrize claims over the session's models, metrics, tiny architectures and perturbations.

The lists come from the registries: models and metrics from the options (validated by the esa
plugin against ``esa.metrics.METRICS``; model names with ``check_model_name``), the trained models
profiled by the architecture claims from the options plus ``esa.models.family.family_names()`` (no
research claim runs on a random-init model: those are code-path tests in tests/), perturbations
from criteria.py, each checked at collection to
be registered in ``esa.perturb.PERTURBATIONS`` (metrics named in criteria.py likewise); a test
that parametrizes ``perturbation`` itself keeps its own list. A module's ``SHARES`` (perturbation
-> key) marks the claims of that perturbation ``shares(key)``: their own xdist worker group."""

from pathlib import Path

import pytest
from criteria import (
    NULL_PERTURBATIONS,
    PERTURBATIONS,
    PRUNE_METHODS,
    RANK_METRICS,
    TAMPER_METRIC,
    ZEROSHOT_TASKS,
)

from esa import perturb
from esa.claims.plugin import OPTIONS_KEY
from esa.metrics import METRICS
from esa.models import check_model_name
from esa.models.family import family_names


def unregistered() -> str | None:
    """One line naming the first criteria.py name missing from its registry, else None."""
    named = {
        "perturbation": ([*PERTURBATIONS, *NULL_PERTURBATIONS], perturb.PERTURBATIONS),
        "metric": ([*RANK_METRICS, *(m for m, _ in PRUNE_METHODS), TAMPER_METRIC], METRICS),
    }
    for kind, (names, registry) in named.items():
        missing = [n for n in names if n not in registry]
        if missing:
            return (
                f"criteria.py names {kind} {missing[0]!r}, not registered; use one of {', '.join(registry)}"
            )
    return None


def pytest_configure(config):
    message = unregistered()
    if message:
        raise pytest.UsageError(message)


def pytest_generate_tests(metafunc):
    options = metafunc.config.stash[OPTIONS_KEY]
    if "model" in metafunc.fixturenames:
        for name in options.models:
            check_model_name(name)  # a typo fails collection with one line, not a traceback
        metafunc.parametrize("model", options.models)
    if "metric" in metafunc.fixturenames:
        metafunc.parametrize("metric", options.metrics)
    if "profiled" in metafunc.fixturenames:  # the session's models and the trained scaling family
        metafunc.parametrize("profiled", list(dict.fromkeys([*options.models, *family_names()])))
    if "perturbation" in metafunc.fixturenames and not parametrized(metafunc, "perturbation"):
        shares = getattr(metafunc.module, "SHARES", {})  # perturbation -> `shares` key of its claims
        metafunc.parametrize(
            "perturbation",
            [
                pytest.param(p, marks=pytest.mark.shares(shares[p])) if p in shares else p
                for p in PERTURBATIONS
            ],
        )


def parametrized(metafunc, name: str) -> bool:
    """True when the test parametrizes ``name`` itself (``@pytest.mark.parametrize``), e.g. the
    null-distribution claims over a subset of the perturbations."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


@pytest.fixture
def workbench(esa_workbench, esa_header, request):
    """The session's claims workbench (``esa_workbench``); notes the model's data provenance in
    the report header."""
    model = getattr(request.node, "callspec", None) and request.node.callspec.params.get("model")
    if model:
        esa_header.setdefault("data", {})[model] = esa_workbench.data_manifest(model)
        esa_header.setdefault("models", {})[model] = esa_workbench.model(model).describe()
    return esa_workbench


@pytest.fixture(scope="session")
def zeroshot_examples():
    """The hand-written multiple-choice samples in fixtures/zeroshot (task -> examples)."""
    from esa.analyses.zeroshot import load_task

    folder = Path(__file__).resolve().parent.parent / "fixtures" / "zeroshot"
    return {t: load_task(folder / f"sample_{t}.jsonl") for t in ZEROSHOT_TASKS}
