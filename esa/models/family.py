"""The trained scaling family: small GPT-NeoX models registered as ``scaling-neox-<size>``.

The weights live in the repository (``fixtures/scaling/``, made by
``fixtures/train_scaling_family.py``) and are listed in ``fixtures/scaling/family.json``. Each
member is registered in esa's model registry at import (``esa.models.registry`` imports this module), so
``esa.models.load_model("scaling-neox-91k")`` works. Without the fixture folder (esa installed
from a wheel) nothing is registered and ``family_names()`` is empty.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from esa.errors import ModelError
from esa.models.loaded import LoadedModel, from_module
from esa.models.registry import register_model
from esa.models.tokenizer import builtin_tokenizer
from esa.util.files import file_sha256
from esa.util.runtime import package_root

log = logging.getLogger("esa")

FIXTURE_DIR = package_root() / "fixtures" / "scaling"
PREFIX = "scaling-"


@functools.lru_cache(maxsize=1)
def _manifest() -> dict | None:
    path = FIXTURE_DIR / "family.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("esa: cannot read %s (%s); the scaling family is not registered", path, exc)
        return None


def family_members() -> list[dict]:
    """The family's ``family.json`` rows, sorted by total parameter count, each with its
    registry ``name`` (``scaling-neox-<size>``), ``member`` (the folder name) and ``path``."""
    manifest = _manifest()
    if manifest is None:
        return []
    rows = []
    for m in sorted(manifest.get("models", []), key=lambda m: m["params_total"]):
        rows.append(
            {
                **m,
                "member": m["name"],
                "name": PREFIX + m["name"],
                "path": str(FIXTURE_DIR / m.get("dir", m["name"])),
            }
        )
    return rows


def family_names() -> list[str]:
    """Registry names of the family, smallest model first."""
    return [m["name"] for m in family_members()]


def family_manifest() -> dict:
    """The whole ``family.json`` (recipe, data, environment, models); ``{}`` when absent."""
    return dict(_manifest() or {})


def load_member(name: str, directory: str | Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load one saved member folder as a LoadedModel (source "fixture")."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{name}: {weights} is missing: run python fixtures/train_scaling_family.py")
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    model.to(device=device)
    return from_module(
        name, model, builtin_tokenizer(), "fixture", {"name": name, "sha256": file_sha256(weights)}
    )


def _register(row: dict) -> None:
    name, path = row["name"], row["path"]
    description = (
        f"GPT-NeoX trained on WikiText-2 valid, {row['params_total']:,} params "
        f"({row['params_non_embedding']:,} non-embedding), "
        f"hidden {row['hidden_size']} x {row['num_layers']} layers, "
        f"held-out ppl {row['heldout_ppl']:.1f}"
    )

    @register_model(name, source="fixture", description=description)
    def _build(dtype, device, seed):  # trained weights: the seed does not apply
        return load_member(name, path, dtype, device)


for _row in family_members():
    _register(_row)
