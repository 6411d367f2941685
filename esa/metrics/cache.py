"""Score cache: safetensors files keyed by (model, weights, data, metric, seed, settings); never pickle.

An entry holds either candidates (default: ``esa.metrics.candidates``: per-tensor top and bottom
candidates for selections of up to ``max_k`` entries, the score summary and a histogram sample,
a few MB where the scores take GB) or, when the caller asks with ``full=True``, the whole score
tensors (the claims that need whole distributions). A whole-tensor entry also answers a
candidate request (candidates are built from it); a candidate entry answers a whole-tensor
request never, nor one for more than its ``max_k``. Size, eviction and failed writes:
``esa.metrics.cache_store``. A file whose key, tensor names or shapes do not match, or that
cannot be read, is a miss (recomputed by the caller).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from esa.metrics import cache_store, registry  # registry.compute_scores: looked up per call (tests patch it)
from esa.metrics.candidates import LISTS, CandidateScores, build_candidates, candidate_cap
from esa.util.serialize import plain

log = logging.getLogger("esa")
FORMAT = 2  # entry layout; files without an "esa_entry" header are format 1 (whole tensors by name)


def cache_key(**parts) -> dict:
    """A JSON-able key; values are converted to plain types."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def entry_path(folder: Path, key: dict) -> Path:
    """``<folder>/<metric>-<sha256 of the key, 24 hex>.safetensors`` (folder: ``scores_dir``)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return folder / f"{key.get('metric', 'scores')}-{digest}{cache_store.SUFFIX}"


def full_writer(key: dict, scores: dict[str, torch.Tensor]) -> tuple[Callable[[Path], None], int]:
    """(a function writing the safetensors entry with the whole score tensors to a path, the
    entry's size in bytes at most). The file is written from the tensors themselves
    (``safetensors.torch.save_file``): no bytes copy of a model-sized set in memory."""
    from safetensors.torch import save_file

    shapes = {n: list(s.shape) for n, s in scores.items()}
    tensors = {f"full/{n}": s.detach().to("cpu").contiguous() for n, s in scores.items()}
    meta = _metadata(key, {"kind": "full", "names": list(scores), "shapes": shapes})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    header = 8 + len(json.dumps(meta)) + sum(len(n) + 96 for n in tensors)  # JSON header, bound
    return (lambda path: save_file(tensors, str(path), metadata=meta)), size + header


def encode_candidates(key: dict, cands: CandidateScores) -> bytes:
    """The safetensors bytes of an entry with the candidates ``cands`` (indices as int32 where
    they fit)."""
    tensors = {}
    for list_name, per in cands.lists.items():
        for name, (idx, vals, _) in per.items():
            small = math.prod(cands.shapes[name]) < 2**31
            tensors[f"{list_name}/{name}/index"] = idx.to(torch.int32 if small else torch.int64)
            tensors[f"{list_name}/{name}/score"] = vals.contiguous()
    tensors.update({f"dense/{n}": v.contiguous() for n, v in cands.dense.items()})
    tensors["sample"] = cands.sample.contiguous()
    entry = {
        "kind": "candidates",
        "names": list(cands),
        "shapes": {n: list(s) for n, s in cands.shapes.items()},
        "seed": cands.seed,
        "cap": cands.cap,
        "nonzero": cands.nonzero,
        "complete": {ln: {n: e[2] for n, e in per.items()} for ln, per in cands.lists.items()},
        "summary": plain(cands.summary),  # json keeps NaN / inf (a NaN token inside the header string)
    }
    return _pack(key, entry, tensors)


def _pack(key: dict, entry: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=_metadata(key, entry))


def _metadata(key: dict, entry: dict) -> dict[str, str]:
    entry = {"format": FORMAT, "created": time.time(), **entry}
    return {"esa_key": json.dumps(key, sort_keys=True), "esa_entry": json.dumps(entry)}


def load_entry(
    path: Path,
    key: dict,
    shapes: dict[str, tuple],
    *,
    full: bool,
    cap: int,
    seed: int,
    params=None,
    device=None,
):
    """The whole scores (``full``) or candidates with at least ``cap`` per list from ``path``;
    None on a miss (absent, other key, names or shapes, too few candidates, unreadable)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if json.loads(meta.get("esa_key", "null")) != key:
                log.warning("esa: score cache %s has a different key; recomputing", path.name)
                return None
            entry = json.loads(meta.get("esa_entry", "null")) or {"kind": "full", "format": 1}
            if set(entry.get("names") or fh.keys()) != set(shapes):
                log.warning("esa: score cache %s holds other tensors; recomputing", path.name)
                return None
            got: dict | CandidateScores | None
            if entry["kind"] == "full":
                prefix = "full/" if entry.get("format", 1) >= 2 else ""
                got = {n: fh.get_tensor(prefix + n) for n in shapes}
                ok = all(tuple(got[n].shape) == tuple(shapes[n]) for n in shapes)
            elif full or int(entry["cap"]) < cap or int(entry["seed"]) != seed:
                return None
            else:
                got, ok = _candidates(fh, entry, shapes)
    except Exception as exc:  # corrupt or truncated file
        log.warning("esa: score cache %s unreadable (%s); recomputing", path.name, type(exc).__name__)
        return None
    if not ok or got is None:
        log.warning("esa: score cache %s has wrong shapes; recomputing", path.name)
        return None
    cache_store.touch(path)
    if isinstance(got, CandidateScores):
        return got
    if full:
        return {n: s.to(device) if device is not None else s for n, s in got.items()}
    return build_candidates(got, cap, seed, params)


def _candidates(fh, entry: dict, shapes: dict[str, tuple]) -> tuple[CandidateScores | None, bool]:
    """(candidates from an open entry, whether its shapes are ``shapes``)."""
    stored = {n: tuple(int(d) for d in s) for n, s in entry["shapes"].items()}
    if any(stored[n] != tuple(int(d) for d in shapes[n]) for n in shapes):
        return None, False
    keys = set(fh.keys())
    lists: dict = {ln: {} for ln in LISTS}
    for list_name, per in entry["complete"].items():
        for name, complete in per.items():
            idx = fh.get_tensor(f"{list_name}/{name}/index").to(torch.long)
            lists[list_name][name] = (idx, fh.get_tensor(f"{list_name}/{name}/score"), bool(complete))
    cands = CandidateScores(
        int(entry["seed"]),
        int(entry["cap"]),
        {n: stored[n] for n in entry["names"]},
        lists,
        {n: fh.get_tensor(f"dense/{n}") for n in entry["names"] if f"dense/{n}" in keys},
        {n: int(v) for n, v in entry["nonzero"].items()},
        entry["summary"],
        fh.get_tensor("sample"),
    )
    return cands, True


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
    full: bool = False,
    max_k: int = 100,
    memory_limit: int | None = None,
):
    """``metric`` scores on ``seed``'s calibration windows, from the cache when it holds them.

    Returns the whole scores ``{name: tensor}`` on the model's device when ``full``, else
    ``CandidateScores`` that answer ``esa.select.select`` for k ≤ ``max_k`` exactly like the whole
    scores (recomputing them in the rare case the candidates cannot decide), with ``.summary``
    (``score_summary``) and ``.sample`` (a histogram sample). The key covers model identity and
    weights, dtype, data, windows and settings. A miss writes what was asked for: the whole
    tensors (candidates instead when they exceed the cache cap) or the candidates."""
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
        **({"bos": data.bos.get("token_id")} if data.bos.get("prepended") else {}),  # windows start with BOS
        **({} if score_dtype == torch.float32 else {"score_dtype": str(score_dtype)}),
    )
    path = entry_path(cache_store.scores_dir(cache_root), key)
    wanted = set(names)
    params = {n: p for n, p in lm.model.named_parameters() if n in wanted}
    cap = candidate_cap(max_k)
    recompute = functools.partial(
        registry.compute_scores,
        lm,
        metric,
        calib,
        seed=seed,
        batch_size=batch_size,
        hutchinson_samples=hutchinson_samples,
        names=list(names),
        progress=progress,
        score_dtype=score_dtype,
        memory_limit=memory_limit,  # not in the key: it changes how the scores are computed, not them
    )
    got = None
    if use_cache:
        shapes = {n: tuple(lm.param_map[n].shape) for n in names}
        device = next(lm.model.parameters()).device
        got = load_entry(path, key, shapes, full=full, cap=cap, seed=seed, params=params, device=device)
        if got is not None:
            log.info("esa: scores %s seed %d from cache", metric, seed)
    if got is None:
        scores = recompute()
        got = scores if full else build_candidates(scores, cap, seed, params)
        if use_cache:
            _save(path, key, scores, got if isinstance(got, CandidateScores) else None, cap, seed, params)
        del scores
    if isinstance(got, CandidateScores):
        got.params, got.recompute = params, recompute
    return got


def _save(
    path: Path, key: dict, scores: dict, cands: CandidateScores | None, cap: int, seed: int, params
) -> None:
    """Write the whole ``scores`` when they were asked for (``cands`` None) and fit the cap,
    else the candidates (built here when needed)."""
    if cands is None:
        whole = sum(s.numel() * s.element_size() for s in scores.values())
        try:
            fits = whole <= cache_store.max_bytes()
        except Exception as exc:  # a bad ESA_CACHE_MAX_BYTES: warned by the write below
            log.debug("esa: %s", exc)
            fits = True
        if fits:
            cache_store.write(path, *full_writer(key, scores))
            return
        log.info("esa: whole scores (%s) exceed the cache cap; caching candidates", cache_store.human(whole))
        cands = build_candidates(scores, cap, seed, params)
    cache_store.write(path, encode_candidates(key, cands))
