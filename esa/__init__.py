"""esa: Extreme Sensitivity Analysis of transformer language models.

The main library calls, imported lazily (``import esa`` loads neither torch nor transformers)::

    import esa

    lm = esa.load_model("smollm2-135m")                       # or tiny-llama, a .gguf, a local dir
    data = esa.prepare_data(lm.tokenizer, max_length=128, max_samples=8)
    base = esa.evaluate(lm.model, data.eval_ids)              # EvalResult: ppl, nll, accuracy, ...
    scores = esa.compute_scores(lm, "grad_x_weight", data.calibration(4, seed=0))
    top = esa.select(scores, k=100, kind="top", mode="per_layer")
    with esa.perturbed(lm.model, top, "zero"):                # restored bit-exactly on exit
        hit = esa.evaluate(lm.model, data.eval_ids)

Layers, bottom to top (each imports only from layers below it): ``errors``, ``util`` →
``models`` → ``data``, ``evaluate``, ``metrics``, ``select``, ``perturb``, ``stats``, ``plots`` →
``analyses`` → ``runbook``, ``claims``, ``bench``, ``cli``. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from esa.errors import ConfigError, DataError, EsaError, ModelError, RestoreError

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access (PEP 562)
_LAZY = {
    "load_model": "esa.models",
    "list_models": "esa.models",
    "register_model": "esa.models",
    "LoadedModel": "esa.models",
    "prepare_data": "esa.data",
    "load_text": "esa.data",
    "DataBundle": "esa.data",
    "evaluate": "esa.evaluate",
    "EvalResult": "esa.evaluate",
    "compute_scores": "esa.metrics",
    "register_metric": "esa.metrics",
    "METRICS": "esa.metrics",
    "select": "esa.select",
    "Selection": "esa.select",
    "perturbed": "esa.perturb",
    "register_perturbation": "esa.perturb",
    "PERTURBATIONS": "esa.perturb",
    "stats": "esa.stats",
    "run_experiment": "esa.runbook",
    "ExperimentConfig": "esa.runbook",
    "detect_super_weights": "esa.analyses.detect",
}

__all__ = ["ConfigError", "DataError", "EsaError", "ModelError", "RestoreError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'esa' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "stats" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
