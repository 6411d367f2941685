"""Model registry and loading: tiny random-init architectures, the embedded GGUF model, GGUF
files, local Hugging Face directories and hub ids (with aliases).

``load_model(name)`` resolves, in order: a registered name (``esa models`` lists them), a hub
alias, a ``.gguf`` file, a local directory with ``config.json``, a hub id ``owner/name``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from esa.errors import ConfigError, ModelError
from esa.params import ParamMap, build_param_map

log = logging.getLogger("esa")

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

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for analysis: module (eval mode), tokenizer, parameter map and provenance."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    source: str  # "tiny" | "embedded" | "gguf" | "local" | "hub" | "arch"
    param_map: ParamMap
    dtype: torch.dtype
    device: torch.device
    identity: dict = field(default_factory=dict)  # what makes its weights unique (for caches)

    def fingerprint(self) -> str:
        """A digest of every weight's bits (computed once), for cache keys."""
        if "fingerprint" not in self.identity:
            self.identity["fingerprint"] = weights_digest(self.model)
        return self.identity["fingerprint"]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        """Plain-typed summary for manifests."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "num_parameters": self.num_parameters,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            **{k: v for k, v in self.identity.items() if k != "name"},
        }




def weights_digest(model: torch.nn.Module) -> str:
    """A cheap digest of every parameter's bits: per tensor the int64 sum of its integer view."""
    import hashlib

    from esa.perturb import bits_checksum

    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            digest.update(f"{pname}:{tuple(p.shape)}:{p.dtype}:{bits_checksum(p.detach())};".encode())
    return digest.hexdigest()[:32]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the raw bytes of every parameter (exact; for restore checks)."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            digest.update(pname.encode())
            digest.update(memoryview(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: ``build(dtype, device, seed) -> LoadedModel``."""

    name: str
    source: str
    description: str
    build: Callable[..., LoadedModel]


REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, source: str, description: str):
    """Decorator registering a builder ``fn(dtype, device, seed) -> LoadedModel`` under ``name``."""

    def decorate(fn):
        REGISTRY[name] = ModelSpec(name, source, description, fn)
        return fn

    return decorate


def list_models() -> list[dict]:
    """Registered names and hub aliases, as plain dicts."""
    _load_builtin_registrations()
    rows = [{"name": s.name, "source": s.source, "description": s.description}
            for s in REGISTRY.values()]
    rows += [{"name": a, "source": "hub", "description": f"alias of {hub}"}
             for a, hub in HUB_ALIASES.items()]
    return rows


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


def worker_gpu() -> int:
    """The GPU index for this process: ``gwN`` (pytest-xdist worker N) -> N mod #GPUs, else the
    current device."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = torch.cuda.device_count()
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        return int(worker[2:]) % count
    return torch.cuda.current_device() if count else 0


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default fp32 on CPU, bf16 on CUDA; strings bf16/fp16/fp32 accepted."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of bf16, fp16, fp32")
    return DTYPES[dtype]


def default_dtype(device=None) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (``None`` = the device esa would pick)."""
    dev = resolve_device(None) if device is None or str(device) == "auto" else torch.device(device)
    return resolve_dtype(None, dev)


def load_model(name: str, dtype=None, device=None, seed: int = 0,
               device_map: str | None = None) -> LoadedModel:
    """Load ``name`` (see module doc) in eval mode, checking its weights are finite.

    ``device_map`` (e.g. "auto") splits a large model over several GPUs with accelerate.
    """
    _load_builtin_registrations()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name in REGISTRY:
        build = REGISTRY[name].build
        if device_map is not None:
            if "device_map" not in inspect.signature(build).parameters:
                raise ConfigError(f"model {name!r} cannot be split with device_map; load it on one device")
            lm = build(dtype=dt, device=dev, seed=seed, device_map=device_map)
        else:
            lm = build(dtype=dt, device=dev, seed=seed)
    else:
        from esa import _hf

        lm = _hf.load_pretrained(name, HUB_ALIASES.get(name, name), dt, dev, device_map)
    lm.model.eval()
    check_finite(lm)
    return lm


def check_model_name(name: str) -> None:
    """Raise ModelError unless ``name`` can name a model (registry, alias, file, dir, hub id).

    Cheap: loads nothing. Used to fail fast (e.g. at pytest collection) on a typo."""
    from pathlib import Path as _Path

    _load_builtin_registrations()
    if name in REGISTRY or name in HUB_ALIASES or _Path(name).expanduser().exists():
        return
    if name.endswith(".gguf"):
        raise ModelError(f"GGUF file {name!r} not found: check the path")
    if "/" in name and not name.startswith((".", "/", "~")):
        return  # a hub id: resolved when loaded
    raise ModelError(f"unknown model {name!r}: run `esa models` for the registry, or pass a local "
                     "Hugging Face directory, a .gguf file or a hub id owner/name")


def check_finite(lm: LoadedModel) -> None:
    """Raise ModelError if any parameter holds NaN or inf (one host sync per device)."""
    flags: dict = {}
    with torch.no_grad():
        for pname, p in lm.model.named_parameters():
            ok = torch.isfinite(p).all()
            flags[p.device] = ok if p.device not in flags else flags[p.device] & ok
    if all(bool(v) for v in flags.values()):
        return
    for pname, p in lm.model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(
                f"model {lm.name!r} has NaN/inf weights in {pname}: re-export or re-download it"
            )


def from_module(name: str, model: torch.nn.Module, tokenizer, source: str, identity=None) -> LoadedModel:
    """Wrap an existing module (e.g. built in a test) as a LoadedModel."""
    p = next(model.parameters())
    return LoadedModel(name, model, tokenizer, source, build_param_map(model), p.dtype, p.device,
                       identity or {"name": name})


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global RNG seeded, restoring the outer RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def cache_dir() -> Path:
    """esa's user cache: $ESA_CACHE_DIR, else $XDG_CACHE_HOME/esa, else ~/.cache/esa."""
    env = os.environ.get("ESA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "esa"


def _load_builtin_registrations() -> None:
    # Importing registers tiny-*, the embedded model and the published architectures.
    from esa import _tiny, _embedded  # noqa: F401

    for optional in ("archs", "family"):  # published architectures, trained scaling family
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"esa.{optional}")
