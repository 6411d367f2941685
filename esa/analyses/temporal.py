"""Temporal stability: how the top-k set and the super weight change over training checkpoints,
and how stable the top-k set is across conditions (seeds, data, dtypes).

``stability_matrix`` compares named selections (conditions or checkpoints, in order): the pairwise
Jaccard J(A, B) = |A ∩ B| / |A ∪ B| and overlap |A ∩ B| / min(|A|, |B|) of their (tensor,
flat index) sets, J between consecutive entries (checkpoint t → t + 1), and the mean / min / max
of J over the pairs i < j (None with fewer than two).

``super_weight_appearance`` follows one super weight through detector reports
(``esa.analyses.detect.detect_super_weights``) of ordered checkpoints: by default the strongest
candidate (largest |output activation|) of the last checkpoint that has one. It reports per
checkpoint whether the detector finds it, the first checkpoint that does (``first_appearance``),
the first from which every later one does (``stable_from``), and, given the checkpoints'
selections, the first whose top-k set holds it (``first_in_topk``).

Checkpoints are model specs as ``esa.models.load_model`` takes them (registered names, local
Hugging Face directories, hub ids), or ``name@revision`` for a hub revision: Pythia publishes its
training checkpoints as revisions ``step0``, ``step1``, ``step2``, ``step4`` ... ``step512``,
``step1000``, ``step2000`` ... ``step143000`` (``pythia_checkpoints``). Offline, download them
elsewhere (``hf download ID --revision step1000 --local-dir DIR``) and pass the directories.
``temporal_stability`` loads each checkpoint in turn, scores it on the same calibration windows,
selects its top-k and runs the detector, keeping one model in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from esa.analyses.detect import SuperWeightReport, detect_super_weights
from esa.errors import ConfigError, ModelError
from esa.metrics import compute_scores
from esa.models import (
    HUB_ALIASES,
    LoadedModel,
    check_finite,
    from_module,
    load_model,
    resolve_device,
    resolve_dtype,
)
from esa.select import Selection, select
from esa.stats import jaccard, overlap

log = logging.getLogger("esa")

PYTHIA_STEPS = (0, *(2**i for i in range(10)), *range(1000, 143001, 1000))


def pythia_checkpoints(
    model: str = "pythia-160m", steps: Sequence[int] = (1000, 16000, 64000, 143000)
) -> list[str]:
    """``model@step<N>`` specs of published Pythia checkpoints (each N must be in PYTHIA_STEPS)."""
    bad = [s for s in steps if s not in PYTHIA_STEPS]
    if bad:
        raise ConfigError(
            f"Pythia publishes no checkpoint at step(s) {bad}: use 0, 1, 2, 4, ..., 512, 1000, 2000, ..."
        )
    return [f"{model}@step{s}" for s in steps]


def split_spec(spec: str) -> tuple[str, str | None]:
    """``name@revision`` -> (name, revision); a spec without ``@`` or an existing path -> (spec, None)."""
    if "@" not in spec or Path(spec).expanduser().exists():
        return spec, None
    name, _, revision = spec.rpartition("@")
    if not name or not revision:
        raise ConfigError(
            f"checkpoint {spec!r}: write a hub revision as NAME@REVISION, e.g. pythia-160m@step1000"
        )
    return name, revision


def load_checkpoint(spec: str, dtype=None, device=None) -> LoadedModel:
    """Load one checkpoint: ``load_model(spec)``, or for ``name@revision`` the hub model ``name``
    (a hub id or an alias such as ``pythia-160m``) at that revision with transformers."""
    name, revision = split_spec(spec)
    if revision is None:
        return load_model(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_id = HUB_ALIASES.get(name, name)
    if "/" not in hub_id:
        raise ModelError(
            f"{spec!r}: revisions need a hub id owner/name or an alias (e.g. pythia-160m@step1000)"
        )
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load {hub_id} at revision {revision!r} ({first[:160]}): without network access, download "
            f"it elsewhere (`hf download {hub_id} --revision {revision} --local-dir DIR`) and pass DIR"
        ) from None
    model.to(device=dev)
    model.eval()
    lm = from_module(spec, model, tokenizer, "hub", {"name": spec, "hub_id": hub_id, "revision": revision})
    check_finite(lm)
    return lm


def stability_matrix(selections: Mapping[str, Selection]) -> dict:
    """Pairwise top-k Jaccard / overlap of named ``Selection``s, in the mapping's order (module doc).

    Returns plain values: names, sizes, jaccard and overlap (n x n lists), consecutive
    ([{from, to, jaccard}] for neighbours), mean_jaccard, min_jaccard, max_jaccard (pairs i < j)."""
    names = list(selections)
    keys = [selections[n].keys() for n in names]
    n = len(names)
    jac = [[jaccard(keys[i], keys[j]) if i != j else 1.0 for j in range(n)] for i in range(n)]
    ovl = [[overlap(keys[i], keys[j]) if i != j else 1.0 for j in range(n)] for i in range(n)]
    pairs = [jac[i][j] for i in range(n) for j in range(i + 1, n)]
    return {
        "names": names,
        "sizes": [len(k) for k in keys],
        "jaccard": jac,
        "overlap": ovl,
        "consecutive": [
            {"from": names[i], "to": names[i + 1], "jaccard": jac[i][i + 1]} for i in range(n - 1)
        ],
        "mean_jaccard": sum(pairs) / len(pairs) if pairs else None,
        "min_jaccard": min(pairs) if pairs else None,
        "max_jaccard": max(pairs) if pairs else None,
    }


def _coordinate(candidate) -> tuple[str, int]:
    return (candidate.param_name, int(candidate.flat_index))


def _first_stable(flags: Sequence[bool]) -> int | None:
    """The first index from which every flag is True (None when the last is False)."""
    start = None
    for i, flag in enumerate(flags):
        if not flag:
            start = None
        elif start is None:
            start = i
    return start


def super_weight_appearance(
    reports: Mapping[str, SuperWeightReport],
    selections: Mapping[str, Selection] | None = None,
    target: tuple[str, int] | None = None,
) -> dict:
    """When the super weight ``target`` (param name, flat index; default: the strongest candidate
    of the last checkpoint that has one) appears in ordered detector ``reports`` (module doc).

    Returns plain values: target ({param_name, flat_index, layer, row, col, found_at} or None),
    checkpoints (per checkpoint: name, n_candidates, spike_layers, detected, strongest, in_topk),
    first_appearance, stable_from, first_in_topk (checkpoint names or None)."""
    names = list(reports)
    found_at = None
    if target is None:
        for name in reversed(names):
            cands = reports[name].candidates
            if cands:
                best = max(cands, key=lambda c: abs(c.output_activation))
                target, found_at = _coordinate(best), name
                break
    rows = []
    where = None
    for name in names:
        report = reports[name]
        cands = report.candidates
        coords = {_coordinate(c): c for c in cands}
        strongest = max(cands, key=lambda c: abs(c.output_activation)) if cands else None
        if target is not None and target in coords and where is None:
            c = coords[target]
            where = {"layer": c.layer, "row": c.row, "col": c.col}
        sel = None if selections is None else selections.get(name)
        chosen = None if sel is None or target is None else sel.keys()
        rows.append(
            {
                "checkpoint": name,
                "n_candidates": len(cands),
                "spike_layers": list(report.spike_layers),
                "detected": target is not None and target in coords,
                "strongest": None if strongest is None else _describe(strongest),
                "in_topk": None if chosen is None else target in chosen,
            }
        )
    stable = _first_stable([bool(r["detected"]) for r in rows])
    in_topk = [r["in_topk"] for r in rows]
    return {
        "target": None
        if target is None
        else {"param_name": target[0], "flat_index": target[1], **(where or {}), "found_at": found_at},
        "checkpoints": rows,
        "first_appearance": next((r["checkpoint"] for r in rows if r["detected"]), None),
        "stable_from": None if stable is None else names[stable],
        "first_in_topk": next((names[i] for i, v in enumerate(in_topk) if v), None),
    }


def _describe(c) -> dict:
    return {
        "param_name": c.param_name,
        "flat_index": int(c.flat_index),
        "layer": int(c.layer),
        "row": int(c.row),
        "col": int(c.col),
        "weight": float(c.weight),
        "output_activation": float(c.output_activation),
    }


def temporal_stability(
    checkpoints: Sequence[str],
    calib: torch.Tensor,
    metric: str = "grad_x_weight",
    k: int = 100,
    mode: str = "per_layer",
    seed: int = 0,
    *,
    dtype=None,
    device=None,
    detect: Mapping | None = None,
    batch_size: int = 4,
    loader: Callable[..., LoadedModel] = load_checkpoint,
    progress: bool = True,
) -> dict:
    """Score, select and detect on each checkpoint in order (module doc); ``calib`` are the
    calibration windows ``[n, L]`` (same tokenizer for every checkpoint); ``detect`` are keyword
    arguments of ``detect_super_weights`` (threshold, ratio, top, prompt).

    Returns plain values: checkpoints, metric, k, mode, seed, stability (``stability_matrix``),
    super_weight (``super_weight_appearance``)."""
    if len(checkpoints) < 2:
        raise ConfigError(f"temporal stability needs at least 2 checkpoints, got {len(checkpoints)}")
    if len(set(checkpoints)) != len(checkpoints):
        raise ConfigError("a checkpoint is listed twice: list each checkpoint once")
    selections: dict[str, Selection] = {}
    reports: dict[str, SuperWeightReport] = {}
    for spec in tqdm(checkpoints, desc="checkpoints", disable=not progress, leave=False):
        lm = loader(spec, dtype=dtype, device=device)
        scores = compute_scores(lm, metric, calib, seed=seed, batch_size=batch_size, progress=False)
        selections[spec] = select(scores, k, kind="top", mode=mode, seed=seed, metric=metric)
        reports[spec] = detect_super_weights(lm, **dict(detect or {}))
        log.info(
            "esa: checkpoint %s: %d top-k entries, %d candidates",
            spec,
            selections[spec].size,
            len(reports[spec].candidates),
        )
        del lm, scores
    return {
        "checkpoints": list(checkpoints),
        "metric": metric,
        "k": int(k),
        "mode": mode,
        "seed": int(seed),
        "stability": stability_matrix(selections),
        "super_weight": super_weight_appearance(reports, selections),
    }
