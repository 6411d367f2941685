"""Score cache: safetensors files keyed by (model, data, metric, seed, settings); never pickle.

A file stores its full key as metadata; a file whose key, tensor names or shapes do not match,
or that cannot be read, is treated as a miss (and recomputed by the caller).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from esa.metrics import registry  # registry.compute_scores is looked up at call time (tests patch it)
from esa.util.files import cache_dir

log = logging.getLogger("esa")


def cache_key(**parts) -> dict:
    """A JSON-able key; values are converted to plain types."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def _path(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "scores" / f"{key.get('metric', 'scores')}-{digest}.safetensors"


def load_scores(
    root: Path, key: dict, shapes: dict[str, tuple], device=None
) -> dict[str, torch.Tensor] | None:
    """Cached scores for ``key`` if present and consistent with ``shapes``, else None."""
    from safetensors import safe_open

    path = _path(root, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if json.loads(meta.get("esa_key", "null")) != key:
                log.warning("esa: score cache %s has a different key; recomputing", path.name)
                return None
            names = set(fh.keys())
            if names != set(shapes):
                log.warning("esa: score cache %s holds other tensors; recomputing", path.name)
                return None
            out = {}
            for name in shapes:
                tensor = fh.get_tensor(name)
                if tuple(tensor.shape) != tuple(shapes[name]):
                    log.warning("esa: score cache %s has wrong shapes; recomputing", path.name)
                    return None
                out[name] = tensor.to(device) if device is not None else tensor
            return out
    except Exception as exc:  # corrupt or truncated file
        log.warning("esa: score cache %s unreadable (%s); recomputing", path.name, type(exc).__name__)
        return None


def save_scores(root: Path, key: dict, scores: dict[str, torch.Tensor]) -> Path | None:
    """Write scores atomically (temp file + rename). Returns the path, or None if not writable."""
    from safetensors.torch import save_file

    path = _path(root, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        cpu = {n: t.detach().to("cpu").contiguous() for n, t in scores.items()}
        save_file(cpu, tmp, metadata={"esa_key": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
        return path
    except OSError as exc:
        log.warning("esa: could not write score cache (%s)", exc)
        return None


def cached_scores(
    lm,
    data,
    metric: str,
    seed: int,
    *,
    calib_windows: int,
    batch_size: int,
    hutchinson_samples: int,
    names,
    use_cache: bool = True,
    cache_root=None,
    progress: bool = True,
    score_dtype: torch.dtype = torch.float32,
) -> dict:
    """Compute (or load from the safetensors cache) ``metric`` scores on ``seed``'s calibration
    windows. The cache key covers model identity, dtype, data, windows and settings."""
    calib = data.calibration(calib_windows, seed)
    key = cache_key(
        model=lm.name,
        weights=lm.fingerprint(),
        dtype=str(lm.dtype),
        metric=metric,
        metric_version=registry.METRICS[metric].version,
        seed=seed,
        calib_sha256=data.calib_source.sha256,
        max_length=data.max_length,
        calib_windows=int(calib.shape[0]),
        eval_windows=int(data.eval_ids.shape[0]),
        batch_size=batch_size,
        hutchinson_samples=hutchinson_samples,
        names=sorted(names),
        **({} if score_dtype == torch.float32 else {"score_dtype": str(score_dtype)}),
    )
    root = Path(cache_root) if cache_root else cache_dir()
    device = next(lm.model.parameters()).device
    if use_cache:
        shapes = {n: lm.param_map[n].shape for n in names}
        hit = load_scores(root, key, shapes, device=device)
        if hit is not None:
            log.info("esa: scores %s seed %d from cache", metric, seed)
            return hit
    scores = registry.compute_scores(
        lm,
        metric,
        calib,
        seed=seed,
        batch_size=batch_size,
        hutchinson_samples=hutchinson_samples,
        names=names,
        progress=progress,
        score_dtype=score_dtype,
    )
    if use_cache:
        save_scores(root, key, scores)
    return scores
