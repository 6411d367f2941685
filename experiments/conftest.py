"""Parametrize claims over the session's models, metrics, tiny architectures and perturbations."""

from pathlib import Path

import pytest
from criteria import PERTURBATIONS, ZEROSHOT_TASKS

from esa.claims.plugin import OPTIONS_KEY
from esa.models import check_model_name
from esa.models.tiny import tiny_models

TINY_ARCHS = tuple(tiny_models())


def pytest_generate_tests(metafunc):
    options = metafunc.config.stash[OPTIONS_KEY]
    if "model" in metafunc.fixturenames:
        for name in options.models:
            check_model_name(name)  # a typo fails collection with one line, not a traceback
        metafunc.parametrize("model", options.models)
    if "metric" in metafunc.fixturenames:
        metafunc.parametrize("metric", options.metrics)
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", TINY_ARCHS)
    if "profiled" in metafunc.fixturenames:  # the session's models and every tiny architecture
        metafunc.parametrize("profiled", list(dict.fromkeys([*options.models, *TINY_ARCHS])))
    if "perturbation" in metafunc.fixturenames:
        metafunc.parametrize("perturbation", PERTURBATIONS)


@pytest.fixture
def bench(esa_bench, esa_header, request):
    """The session workbench; notes the model's data provenance in the report header."""
    model = getattr(request.node, "callspec", None) and request.node.callspec.params.get("model")
    if model:
        esa_header.setdefault("data", {})[model] = esa_bench.data_manifest(model)
        esa_header.setdefault("models", {})[model] = esa_bench.model(model).describe()
    return esa_bench


@pytest.fixture(scope="session")
def zeroshot_examples():
    """The hand-written multiple-choice samples in fixtures/zeroshot (task -> examples)."""
    from esa.analyses.zeroshot import load_task

    folder = Path(__file__).resolve().parent.parent / "fixtures" / "zeroshot"
    return {t: load_task(folder / f"sample_{t}.jsonl") for t in ZEROSHOT_TASKS}
