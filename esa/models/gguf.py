"""GGUF files: any GGUF that transformers can dequantize, as a float model, with a cache.

``load_gguf(name, path, dtype, device)`` dequantizes the file with transformers (every
architecture its GGUF loader supports; tied or untied embeddings: a file without ``output.weight``
ties the head to ``token_embd``) and caches the float32 result as a plain Hugging Face directory
(``config.json`` without the GGUF ``quantization_config``, ``model.safetensors``, the tokenizer
files and ``esa_cache.json``), keyed by the file's sha256 and the transformers version:

    key = {"gguf_sha256": sha256(file bytes), "transformers": transformers.__version__}
    cache = <cache_dir>/gguf/<sha256>/            (the embedded model passes its own directory)

A later load with the same key reads the cache with ``from_pretrained`` (no GGUF parsing, no
dequantization, no random init: ~0.5 s for 135M parameters against ~20 s); a cache with another
key, or one that fails to load, is rebuilt. Progress: transformers' own bar over the tensors while
dequantizing, and one log line per stage. Writing the cache is a side job: failing to write it
warns and the model is still returned. The tokenizer comes from the file (its BOS convention,
``tokenizer.ggml.add_bos_token``, survives the cache round trip in ``tokenizer.json``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from esa.errors import ModelError
from esa.models.loaded import LoadedModel, from_module
from esa.util.files import cache_dir, file_sha256

log = logging.getLogger("esa")

META = "esa_cache.json"


def cache_key(path: Path) -> dict:
    """What a cached dequantization must match: the file's sha256 and the transformers version."""
    import transformers

    return {"gguf_sha256": file_sha256(path), "transformers": transformers.__version__}


def default_cache(sha256: str) -> Path:
    """Where the dequantized weights of a GGUF with this sha256 are cached."""
    return cache_dir() / "gguf" / sha256


def load_gguf(
    name: str,
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    source: str = "gguf",
    cache: Path | None = None,
) -> LoadedModel:
    """Load the GGUF at ``path`` as a float model on ``device`` in ``dtype``, from the dequantized
    cache when it matches (see module doc), else by dequantizing the file and caching the result."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a .gguf file needs the gguf package: pip install 'gguf>=0.10'")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} not found: check the path")
    log.info("esa: %s: sha256 ...", path.name)
    key = cache_key(path)
    deq = Path(cache) if cache is not None else default_cache(key["gguf_sha256"])
    loaded = read_cache(deq, key)
    if loaded is None:
        log.warning(
            "esa: %s: dequantizing with transformers (first use of this file; cached in %s)", path.name, deq
        )
        loaded = dequantize(path)
        write_cache(*loaded, deq, key)
    else:
        log.info("esa: %s: dequantized weights from the cache %s", path.name, deq)
    model, tokenizer = loaded
    model.to(device=device, dtype=dtype)
    identity = {"name": name, "gguf": path.name, "gguf_sha256": key["gguf_sha256"]}
    return from_module(name, model, tokenizer, source, identity)


def dequantize(path: Path) -> tuple[torch.nn.Module, object]:
    """The file as a float32 transformers model on the CPU, and its tokenizer (transformers'
    GGUF loader, weights unpacked: ``GgufConfig(dequantize=True)`` where transformers has it)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": path.name}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # newer transformers could keep the blocks packed otherwise
        kwargs["quantization_config"] = gguf_config(gguf_file=path.name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # unsupported architecture, unreadable file, ...: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(
            f"transformers {transformers.__version__} cannot load {path.name} ({first}): use a GGUF of an "
            "architecture its GGUF loader supports, or the model as a local Hugging Face directory"
        ) from None
    return model, tokenizer


def read_cache(deq: Path, key: dict) -> tuple[torch.nn.Module, object] | None:
    """The cached float32 model and tokenizer when ``deq`` holds a cache for ``key``, else None
    (an unusable cache warns and reads as a miss)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if _read_json(deq / META) != key:
        return None
    try:
        config = AutoConfig.from_pretrained(deq)
        if hasattr(config, "quantization_config"):  # caches written before it was dropped
            del config.quantization_config
        model = AutoModelForCausalLM.from_pretrained(deq, config=config, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(deq)
    except Exception as exc:  # corrupt cache: rebuild it from the GGUF
        log.warning("esa: dequantized cache %s unusable (%s); rebuilding it", deq, type(exc).__name__)
        return None


def write_cache(model: torch.nn.Module, tokenizer, deq: Path, key: dict) -> None:
    """Write ``deq`` (a plain HF directory + ``esa_cache.json``) through a temporary directory
    moved into place; any failure warns and leaves no partial cache."""
    from safetensors.torch import save_model

    tmp = None
    try:
        deq.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=deq.parent, prefix=f".{deq.name}."))
        config = json.loads(model.config.to_json_string())  # type: ignore[union-attr,operator]
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(key))
        os.chmod(tmp, 0o755)
        shutil.rmtree(deq, ignore_errors=True)
        os.replace(tmp, deq)
    except Exception as exc:  # a cache is a side job: warn, never fail the load
        log.warning("esa: could not cache the dequantized weights in %s (%s)", deq, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
