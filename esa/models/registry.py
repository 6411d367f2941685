"""The model registry: names -> builders, hub aliases, device and dtype resolution.

Sources register themselves with ``@register_model(name, source=..., description=...)`` when
imported; ``esa.models.load`` imports every built-in source, so this module imports none of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esa.errors import ConfigError
from esa.models.loaded import LoadedModel
from esa.util.runtime import worker_gpu

HUB_ALIASES = {
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-160m": "EleutherAI/pythia-160m",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


def hub_error(hub_id: str, reason: str) -> str:
    """The one-line error when the hub model ``hub_id`` cannot be had (no network, offline and
    not cached, gated, unknown id): ``reason`` and how to pre-download it."""
    return (
        f"cannot load {hub_id!r} from the Hugging Face hub ({reason[:160]}): pre-download it where the "
        f"hub is reachable, `hf download {hub_id} --local-dir DIR` (`huggingface-cli download` before "
        "huggingface_hub 1.0), then pass the directory (--esa-model DIR, esa --model DIR); or set "
        "HF_HOME to a Hugging Face cache that holds it, with HF_HUB_OFFLINE=1 to use only that cache"
    )


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: ``build(dtype, device, seed) -> LoadedModel``."""

    name: str
    source: str
    description: str
    build: Callable[..., LoadedModel]

    def __call__(
        self, dtype: torch.dtype, device: torch.device, seed: int, device_map: str | None
    ) -> LoadedModel:
        if device_map is None:
            return self.build(dtype=dtype, device=device, seed=seed)
        if "device_map" not in inspect.signature(self.build).parameters:
            raise ConfigError(f"model {self.name!r} cannot be split with device_map; load it on one device")
        return self.build(dtype=dtype, device=device, seed=seed, device_map=device_map)


REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, source: str, description: str) -> Callable:
    """Decorator registering a builder ``fn(dtype, device, seed) -> LoadedModel`` under ``name``."""

    def decorate(fn: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
        REGISTRY[name] = ModelSpec(name, source, description, fn)
        return fn

    return decorate


RANDOM_INIT_SOURCES = ("tiny", "arch")  # registered sources whose weights are a random initialization


def is_random_init(name: str) -> bool:
    """Whether registered model `name` has random-init weights (research claims skip those)."""
    spec = REGISTRY.get(name)
    return spec is not None and spec.source in RANDOM_INIT_SOURCES


def registered(source: str) -> list[str]:
    """Registered names of one source ("tiny", "arch", "family", ...), in registration order."""
    return [s.name for s in REGISTRY.values() if s.source == source]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu. Under pytest-xdist with several GPUs, worker
    ``gwN`` gets ``cuda:N mod #GPUs`` (one worker per GPU: ``pytest -n <#GPUs>``)."""
    if device is None or str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{worker_gpu()}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default fp32 on CPU, bf16 on CUDA; strings bf16/fp16/fp32 accepted."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (``None`` = the device esa would pick)."""
    dev = resolve_device(None) if device is None or str(device) == "auto" else torch.device(device)
    return resolve_dtype(None, dev)
