"""Benchmark sections of the scoring side:

- ``score``: the scoring pass (grad_x_weight, grad_squared over N calibration windows) vs a plain
  ``loss.backward()`` loop; tokens/s, peak memory and the memory plan esa chose (checkpointing,
  offloaded accumulators), fp32 scores with esa's auto policy, and at 7-8B also bf16 lean scores,
  forced checkpointing and fp32 under a hard ``--score-limit-gb`` cap (accumulators offloaded);
- ``select``: per-layer and global top-k (k=100/300) over all weights: time and extra memory;
- ``perturb``: perturb + restore (verified) of those selections.

``hutchinson``, ``hessian``: esa.bench.sections_curvature; ``accuracy``: esa.bench.sections_accuracy.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from esa.bench.baselines import plain_grad_x_weight
from esa.bench.harness import RUNBOOK_PERTURBATIONS, Bench, Section, timed, vocab
from esa.data import random_windows
from esa.metrics.registry import compute_scores
from esa.models import LoadedModel
from esa.perturb import PerturbInfo, perturbed
from esa.select import Selection, select
from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, reset_peak, sync

# (label, metric or None for the plain loop, options for compute_scores, device cap in GB or None)
Variant = tuple[str, str | None, dict, float | None]


def section_score(bench: Bench) -> None:
    """Per architecture and variant: tokens/s, peak GiB, the memory plan esa chose."""
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
            with sec.guard(f"{arch} warm-up"):  # untimed: first backward kernels, activation probe
                compute_scores(lm, "grad_x_weight", calib[:bs], batch_size=bs, progress=False)
                plain_grad_x_weight(lm, calib[:bs], bs, names)
                free_memory()
            wanted = [w for w in getattr(args, "score_only", "").split(",") if w]
            for variant in score_variants(arch, args.score_limit_gb):
                if wanted and not any(w in variant[0] for w in wanted):
                    continue
                if sec.left() < 10:
                    break
                with sec.guard(f"{arch} {variant[0]}"):
                    _score_variant(sec, lm, arch, variant, calib, names, bs)
                free_memory()
        bench.drop_model()


def score_variants(arch: str, limit_gb: float) -> list[Variant]:
    """The plain loop, esa's default (auto plan) for both first-order metrics, and at 7-8B the
    lean bf16 mode, forced checkpointing and fp32 under a hard ``limit_gb`` cap."""
    fp32 = torch.float32
    variants: list[Variant] = [
        ("plain grad_x_weight (loss.backward, bf16 .grad)", None, {}, None),
        ("esa grad_x_weight fp32 (auto)", "grad_x_weight", {"score_dtype": fp32}, None),
        ("esa grad_squared fp32 (auto)", "grad_squared", {"score_dtype": fp32}, None),
    ]
    if "8b" in arch or "7b" in arch:
        variants += [
            ("esa grad_x_weight bf16 (lean)", "grad_x_weight", {"score_dtype": torch.bfloat16}, None),
            ("esa grad_x_weight fp32, checkpoint=True", "grad_x_weight", {"checkpoint": True}, None),
            (f"esa grad_x_weight fp32, {limit_gb:g} GB cap", "grad_x_weight", {}, limit_gb),
        ]
    return variants


def host_bytes(lm: LoadedModel, scores: dict[str, torch.Tensor]) -> int:
    """Bytes of the scores held in host memory (offloaded accumulators) of a model on a GPU."""
    if not next(lm.model.parameters()).is_cuda:
        return 0
    return sum(s.numel() * s.element_size() for s in scores.values() if s.device.type == "cpu")


@contextlib.contextmanager
def device_cap(limit_gb: float | None) -> Iterator[int | None]:
    """A hard cap on this process's CUDA memory for the block (allocations past it fail), yielded
    in bytes; no cap for None or without CUDA."""
    if limit_gb is None or not torch.cuda.is_available():
        yield None
        return
    limit = int(limit_gb * 1e9)
    free_memory()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), 0)
    try:
        yield limit
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def _score_variant(
    sec: Section,
    lm: LoadedModel,
    arch: str,
    variant: Variant,
    calib: torch.Tensor,
    names: list[str],
    bs: int,
) -> None:
    label, metric, options, limit_gb = variant
    extra: dict[str, Any] = {}
    last: dict[str, Any] = {}  # the scores of the latest repeat (checked after the timing)

    def run() -> None:
        last.clear()
        if metric is None:
            plain_grad_x_weight(lm, calib, bs, names)
            extra["memory_plan"] = {"checkpoint": False, "offloaded": 0}
            return
        report: dict[str, Any] = {}
        last.update(
            compute_scores(
                lm, metric, calib, batch_size=bs, progress=False, memory_limit=limit, report=report, **options
            )
        )
        extra["memory_plan"] = report.get("memory_plan")

    with device_cap(limit_gb) as limit:
        base = reset_peak()
        secs, _ = timed(run, sec.bench.args.repeats)  # median of the repeats
        reserved = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else 0.0
    if last:
        extra["host_scores_gib"] = host_bytes(lm, last) / GIB
        extra["finite"] = all(bool(torch.isfinite(s).all()) for s in last.values())
        last.clear()
    row = sec.row(
        arch=arch,
        variant=label,
        windows=int(calib.shape[0]),
        batch_size=bs,
        tok_s=calib.numel() / secs,
        seconds=secs,
        peak_gib=peak_gpu_bytes() / GIB,
        peak_gb=peak_gpu_bytes() / 1e9,
        reserved_gib=reserved,
        extra_gib=(peak_gpu_bytes() - base) / GIB,
        limit_gb=limit_gb,
        weights_gib=sum(p.numel() * p.element_size() for p in lm.model.parameters()) / GIB,
        checkpointing=bool((extra.get("memory_plan") or {}).get("checkpoint")),
        **extra,
    )
    print(
        f"[bench] score {arch} {label}: {row['tok_s']:.0f} tok/s peak {row['peak_gib']:.1f} GiB "
        f"plan {row.get('memory_plan')}",
        flush=True,
    )


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
