"""Benchmark sections of the scoring side:

- ``score``: the scoring pass (grad_x_weight, grad_squared over N calibration windows) vs a plain
  ``loss.backward()`` loop; tokens/s and peak memory (fp32 scores, and bf16 lean scores at 7-8B);
- ``hutchinson``: hutchinson_diag cost per Rademacher sample (fixed + per-sample seconds);
- ``select``: per-layer and global top-k (k=100/300) over all weights: time and extra memory;
- ``perturb``: perturb + restore (verified) of those selections.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from esa.bench.baselines import plain_grad_x_weight
from esa.bench.harness import RUNBOOK_PERTURBATIONS, Bench, Section, timed, vocab
from esa.data import random_windows
from esa.metrics import registry as metric_registry
from esa.metrics.registry import compute_scores
from esa.models import LoadedModel
from esa.perturb import PerturbInfo, perturbed
from esa.select import Selection, select
from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, reset_peak, sync

# (label, metric or None for the plain loop, score dtype, checkpoint: None = esa's auto policy)
Variant = tuple[str, str | None, torch.dtype, bool | None]


def section_score(bench: Bench) -> None:
    """Per architecture and variant: tokens/s, peak and extra GiB, whether checkpointing was on."""
    args = bench.args
    with bench.section("score") as sec:
        for arch in args.score_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            lm, _ = bench.model(arch)
            names = lm.param_map.scorable()
            calib = random_windows(args.calib_windows, args.length, vocab(lm), seed=2)
            bs = args.score_batch
            variants: list[Variant] = [
                ("plain grad_x_weight (loss.backward, bf16 .grad)", None, torch.float32, None),
                ("esa grad_x_weight fp32", "grad_x_weight", torch.float32, None),
                ("esa grad_squared fp32", "grad_squared", torch.float32, None),
            ]
            if "8b" in arch or "7b" in arch:
                variants.append(("esa grad_x_weight bf16 (lean)", "grad_x_weight", torch.bfloat16, None))
                variants.append(
                    ("esa grad_x_weight fp32, checkpoint=False", "grad_x_weight", torch.float32, False)
                )
            with sec.guard(f"{arch} warm-up"):  # untimed: first backward kernels and handles
                del_ = compute_scores(lm, "grad_x_weight", calib[:bs], batch_size=bs, progress=False)
                del del_
                plain_grad_x_weight(lm, calib[:bs], bs, names)
                free_memory()
            for variant in variants:
                if sec.left() < 10:
                    break
                with sec.guard(f"{arch} {variant[0]}"):
                    _score_variant(sec, lm, arch, variant, calib, names, bs)
                free_memory()
        bench.drop_model()


def _score_variant(
    sec: Section,
    lm: LoadedModel,
    arch: str,
    variant: Variant,
    calib: torch.Tensor,
    names: list[str],
    bs: int,
) -> None:
    label, metric, dtype, force = variant
    base = reset_peak()
    t = time.perf_counter()
    extra: dict[str, Any] = {}
    if metric is None:
        plain_grad_x_weight(lm, calib, bs, names)
        ckpt = False
    else:
        ckpt = _checkpointing(lm, metric, calib, names, bs, dtype, force)
        scores = compute_scores(
            lm, metric, calib, batch_size=bs, progress=False, score_dtype=dtype, checkpoint=force
        )
        extra["finite"] = all(bool(torch.isfinite(s).all()) for s in scores.values())
        del scores
    sync()
    secs = time.perf_counter() - t
    row = sec.row(
        arch=arch,
        variant=label,
        windows=int(calib.shape[0]),
        batch_size=bs,
        tok_s=calib.numel() / secs,
        seconds=secs,
        peak_gib=peak_gpu_bytes() / GIB,
        extra_gib=(peak_gpu_bytes() - base) / GIB,
        weights_gib=sum(p.numel() * p.element_size() for p in lm.model.parameters()) / GIB,
        checkpointing=ckpt,
        **extra,
    )
    print(
        f"[bench] score {arch} {label}: {row['tok_s']:.0f} tok/s peak {row['peak_gib']:.1f} GiB",
        flush=True,
    )


def _checkpointing(
    lm: LoadedModel,
    metric: str,
    calib: torch.Tensor,
    names: list[str],
    bs: int,
    dtype: torch.dtype,
    force: bool | None,
) -> bool:
    """Whether compute_scores checkpoints this pass: ``force``, else the registry's auto policy."""
    if force is not None:
        return force
    ctx = metric_registry.score_context(
        lm,
        metric_registry.METRICS[metric],
        calib,
        names,
        seed=0,
        batch_size=bs,
        hutchinson_samples=1,
        progress=False,
        max_entries=1,
        desc="",
        score_dtype=dtype,
        checkpoint=None,
    )
    return metric_registry._needs_checkpointing(ctx)


def section_hutchinson(bench: Bench) -> None:
    """hutchinson_diag with 1 and 2 samples: seconds_per_sample = t₂ - t₁, fixed = t₁ - per sample."""
    args = bench.args
    with bench.section("hutchinson") as sec:
        for arch in args.hutchinson_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            with sec.guard(arch):
                lm, _ = bench.model(arch)
                calib = random_windows(args.hutchinson_windows, args.length, vocab(lm), seed=3)
                out: dict[str, Any] = {"arch": arch, "windows": int(calib.shape[0]), "length": args.length}
                times = {}
                del_ = compute_scores(
                    lm, "hutchinson_diag", calib[:1], batch_size=1, hutchinson_samples=1, progress=False
                )  # warm-up (kernels, handles), untimed
                del del_
                free_memory()
                for samples in (1, 2):
                    reset_peak()
                    t = time.perf_counter()
                    s = compute_scores(
                        lm,
                        "hutchinson_diag",
                        calib,
                        batch_size=calib.shape[0],
                        hutchinson_samples=samples,
                        progress=False,
                    )
                    del s
                    sync()
                    times[samples] = time.perf_counter() - t
                    out[f"seconds_{samples}_samples"] = times[samples]
                    out[f"peak_gib_{samples}_samples"] = peak_gpu_bytes() / GIB
                    free_memory()
                    if sec.left() < 5:
                        break
                if 2 in times:
                    out["seconds_per_sample"] = times[2] - times[1]
                    out["fixed_seconds"] = times[1] - out["seconds_per_sample"]
                sec.row(**out)
                print(f"[bench] hutchinson {arch}: {out}", flush=True)
            bench.drop_model()


def section_select_perturb(bench: Bench) -> None:
    """``select`` then ``perturb`` on the magnitude scores of every weight of ``--select-arch``."""
    arch = bench.args.select_arch
    selections = _section_select(bench, arch)
    with bench.section("perturb") as sec:
        lm, _ = bench.model(arch)
        for (mode, k, kind), sel in selections.items():
            if kind != "top":
                continue
            for method in RUNBOOK_PERTURBATIONS:
                with sec.guard(f"{mode} {k} {method}"):
                    scale = 0.01 if method == "gauss_noise" else None
                    run = functools.partial(_perturb_once, lm.model, sel, method, scale)
                    run()
                    base = reset_peak()
                    secs, info = timed(run, 3)
                    sec.row(
                        arch=arch,
                        mode=mode,
                        k=k,
                        method=method,
                        n_selected=info.n_selected,
                        n_changed=info.n_changed,
                        tensors=len(info.params),
                        verified=info.verified,
                        seconds=secs,
                        extra_gib=(peak_gpu_bytes() - base) / GIB,
                    )
    bench.drop_model()


def _section_select(bench: Bench, arch: str) -> dict[tuple[str, int, str], Selection]:
    """Time select() per mode, k and kind; returns the selections for the perturb section."""
    selections = {}
    with bench.section("select") as sec:
        lm, _ = bench.model(arch)
        names = lm.param_map.scorable(include_embeddings=True)
        scores = compute_scores(lm, "magnitude", None, names=names, progress=False)
        entries = sum(s.numel() for s in scores.values())
        sec.data["entries"] = entries
        sec.data["tensors"] = len(scores)
        sec.data["scores_gib"] = sum(s.numel() * s.element_size() for s in scores.values()) / GIB
        for mode in ("per_layer", "global"):
            for k in (100, 300):
                for kind in ("top", "bottom", "random") if k == 300 else ("top",):
                    with sec.guard(f"{mode} k={k} {kind}"):
                        select(scores, k, kind, mode)  # warm-up (kernels, allocator)
                        base = reset_peak()
                        secs, sel = timed(functools.partial(select, scores, k, kind, mode), 1)
                        sec.row(
                            arch=arch,
                            mode=mode,
                            k=k,
                            kind=kind,
                            seconds=secs,
                            entries=entries,
                            selected=sel.size,
                            extra_gib=(peak_gpu_bytes() - base) / GIB,
                        )
                        selections[(mode, k, kind)] = sel
        del scores
        free_memory()
    return selections


def _perturb_once(model: Any, sel: Selection, method: str, scale: float | None) -> PerturbInfo:
    """One perturb + verified restore of ``sel`` (synchronised inside, so the timing is honest)."""
    with perturbed(model, sel, method, scale=scale, seed=0) as info:
        sync()
    return info
