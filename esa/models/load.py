"""``load_model(name)``: every way esa can get a model, in one call.

Resolution order: a registered name (``esa models`` lists them: tiny random-init architectures,
the embedded SmolLM2, published architectures, the trained scaling family), a hub alias, a
``.gguf`` file, a local Hugging Face directory with ``config.json``, a hub id ``owner/name``
(`hub_id`; offline, it must be in the Hugging Face cache: `check_hub_cache`).

Adding a model source (see docs/EXTENDING.md):
1. write ``esa/models/<source>.py`` with a builder ``fn(dtype, device, seed) -> LoadedModel``
   decorated with ``@register_model("name", source="<source>", description="...")``;
2. import the module below, next to the other sources;
3. run ``pytest tests/test_models.py``: the registry contract tests load every registered name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

from esa.errors import ModelError
from esa.models import archs, embedded, family, tiny  # noqa: F401  (they register themselves)
from esa.models.loaded import LoadedModel, check_finite
from esa.models.pretrained import load_pretrained
from esa.models.registry import HUB_ALIASES, REGISTRY, hub_error, resolve_device, resolve_dtype

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment variable


def load_model(
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    device_map: str | None = None,
) -> LoadedModel:
    """Load ``name`` (see module doc) in eval mode, checking its weights are finite.

    ``device_map`` (e.g. "auto") splits a large model over several GPUs with accelerate.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name in REGISTRY:
        lm = REGISTRY[name](dt, dev, seed, device_map)
    else:
        hub = hub_id(name)
        if hub is not None:
            check_hub_cache(hub)
        lm = load_pretrained(name, hub or HUB_ALIASES.get(name, name), dt, dev, device_map)
    lm.model.eval()
    check_finite(lm)
    return lm


def list_models() -> list[dict]:
    """Registered names and hub aliases, as plain dicts."""
    rows = [{"name": s.name, "source": s.source, "description": s.description} for s in REGISTRY.values()]
    rows += [{"name": a, "source": "hub", "description": f"alias of {hub}"} for a, hub in HUB_ALIASES.items()]
    return rows


def check_model_name(name: str) -> None:
    """Raise ModelError unless ``name`` can name a model (registry, alias, file, dir, hub id).

    Cheap: loads nothing. Used to fail fast (e.g. at pytest collection) on a typo."""
    if name in REGISTRY or name in HUB_ALIASES or Path(name).expanduser().exists():
        return
    if name.endswith(".gguf"):
        raise ModelError(f"GGUF file {name!r} not found: check the path")
    if hub_id(name) is not None:
        return  # a hub id: resolved when loaded
    raise ModelError(
        f"unknown model {name!r}: run `esa models` for the registry, or pass a local "
        "Hugging Face directory, a .gguf file or a hub id owner/name"
    )


def hub_id(name: str) -> str | None:
    """The hub id that ``name`` names: a hub alias's target, or ``name`` itself when it has the
    form ``owner/name`` and is no path here (an existing file or folder wins over the hub); None
    for registered names, files, folders and other paths. A missing ``folder/name`` whose
    ``folder`` exists here is a mistyped local path, not a hub id: ModelError."""
    if name in REGISTRY:
        return None
    if name in HUB_ALIASES:
        return None if Path(HUB_ALIASES[name]).exists() else HUB_ALIASES[name]
    path = Path(name).expanduser()
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") != 1 or path.exists():
        return None
    if path.parent.is_dir():
        raise ModelError(
            f"no model directory {name!r} (the folder {str(path.parent)!r} exists here, so this is a "
            "local path, not a hub id): check the path"
        )
    return name


def hub_offline() -> bool:
    """True when the hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    set now, or set when huggingface_hub was imported."""
    env = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hub_constants.HF_HUB_OFFLINE) or any(v.strip().upper() in _TRUE for v in env)


def check_hub_cache(hub: str) -> None:
    """Offline (`hub_offline`), the hub model ``hub`` must be in the Hugging Face cache
    (``HF_HOME``): else ModelError at once, one line saying how to pre-download it
    (``registry.hub_error``), before transformers is asked. Online nothing is checked here (failures of
    the download itself are reported by ``esa.models.pretrained``)."""
    if not hub_offline() or isinstance(try_to_load_from_cache(hub, "config.json"), str):
        return
    why = f"HF_HUB_OFFLINE is set and the cache {hub_constants.HF_HUB_CACHE} does not hold it"
    raise ModelError(hub_error(hub, why))
