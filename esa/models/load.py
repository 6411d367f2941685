"""``load_model(name)``: every way esa can get a model, in one call.

Resolution order: a registered name (``esa models`` lists them: tiny random-init architectures,
the embedded SmolLM2, published architectures, the trained scaling family), a hub alias, a
``.gguf`` file, a local Hugging Face directory with ``config.json``, a hub id ``owner/name``.

Adding a model source (see docs/EXTENDING.md):
1. write ``esa/models/<source>.py`` with a builder ``fn(dtype, device, seed) -> LoadedModel``
   decorated with ``@register_model("name", source="<source>", description="...")``;
2. import the module below, next to the other sources;
3. run ``pytest tests/test_models.py``: the registry contract tests load every registered name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from esa.errors import ModelError
from esa.models import archs, embedded, family, tiny  # noqa: F401  (they register themselves)
from esa.models.loaded import LoadedModel, check_finite
from esa.models.pretrained import load_pretrained
from esa.models.registry import HUB_ALIASES, REGISTRY, resolve_device, resolve_dtype


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
        lm = load_pretrained(name, HUB_ALIASES.get(name, name), dt, dev, device_map)
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
    if "/" in name and not name.startswith((".", "/", "~")):
        return  # a hub id: resolved when loaded
    raise ModelError(
        f"unknown model {name!r}: run `esa models` for the registry, or pass a local "
        "Hugging Face directory, a .gguf file or a hub id owner/name"
    )
