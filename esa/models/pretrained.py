"""Loading pretrained weights with transformers: hub ids, local directories and GGUF files
(``esa.models.gguf``: dequantized once, cached by the file's sha256)."""

from __future__ import annotations

from pathlib import Path

import torch

from esa.errors import ModelError
from esa.models.gguf import load_gguf
from esa.models.loaded import LoadedModel, from_module
from esa.models.registry import hub_error


def load_pretrained(
    name: str, target: str, dtype: torch.dtype, device: torch.device, device_map: str | None = None
) -> LoadedModel:
    """Load ``target`` (a .gguf file, a local HF directory or a hub id) with transformers."""
    path = Path(target).expanduser()
    if target.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {target!r} not found: check the path")
        return load_gguf(name, path, dtype, device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{target!r} has no config.json: point --model at a Hugging Face model directory"
            )
        return _from_pretrained(
            name, str(path), dtype, device, device_map, "local", {"path": str(path.resolve())}
        )
    if "/" not in target or path.exists():
        raise ModelError(
            f"unknown model {name!r}: run `esa models` for the registry, or pass a local Hugging Face "
            "directory, a .gguf file or a hub id owner/name"
        )
    try:
        return _from_pretrained(name, target, dtype, device, device_map, "hub", {"hub_id": target})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(hub_error(target, first)) from None


def _from_pretrained(name, target, dtype, device, device_map, source, identity, **kwargs) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = device_map or ({"": str(device)} if device.type == "cuda" else None)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map=placement, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
    if placement is None:
        model.to(device)
    return from_module(name, model, tokenizer, source, {"name": name, **identity})
