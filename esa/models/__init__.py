"""Models: the registry, loading from every source, the parameter map and the offline tokenizer.

>>> from esa.models import load_model
>>> lm = load_model("tiny-llama")
>>> lm.source, lm.param_map["model.layers.0.mlp.down_proj.weight"].component
('tiny', 'mlp_down')
"""

from esa.models.load import check_model_name, list_models, load_model
from esa.models.loaded import LoadedModel, check_finite, from_module, weights_digest, weights_sha256
from esa.models.params import ParamInfo, ParamMap, build_param_map
from esa.models.registry import (
    HUB_ALIASES,
    REGISTRY,
    default_dtype,
    register_model,
    registered,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "HUB_ALIASES",
    "REGISTRY",
    "LoadedModel",
    "ParamInfo",
    "ParamMap",
    "build_param_map",
    "check_finite",
    "check_model_name",
    "default_dtype",
    "from_module",
    "list_models",
    "load_model",
    "register_model",
    "registered",
    "resolve_device",
    "resolve_dtype",
    "weights_digest",
    "weights_sha256",
]
