"""Benchmark section ``accuracy``: how close grad_x_weight scores of a bf16 model come to the fp32
reference, per way of accumulating the calibration gradient (``--accuracy-arch``, 1.4B by default).

The reference is the same weights upcast to fp32 (every op in fp32, TF32 off), esa's
grad_x_weight with fp32 accumulators. Compared, on the bf16 model over the same windows and
batches: esa fp32 accumulators on the device, esa fp32 accumulators offloaded to host memory,
esa lean bf16 accumulators, and plain ``loss.backward()`` into bf16 ``.grad``. Per variant: the
mean over tensors of the per-tensor top-k overlap |A∩B|/k with the reference (k = 100), the global
top-k overlap (k = 1000), and the median over tensors of max|s − s_ref| / max|s_ref|. The two esa
fp32 variants run with the same kernels (checkpointing on), so the offloaded sums should equal the
on-device ones bit for bit (``offload_bitwise_equal``) wherever two on-device runs do
(``rerun_bitwise_equal``): every run here uses deterministic kernels (math attention).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from esa.bench.baselines import plain_grad_x_weight
from esa.bench.harness import Bench, vocab
from esa.bench.sections_scoring import host_bytes
from esa.data import random_windows
from esa.metrics.registry import compute_scores
from esa.select import select
from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, reset_peak, sync

Scores = dict[str, torch.Tensor]


def section_accuracy(bench: Bench) -> None:
    args = bench.args
    with bench.section("accuracy") as sec:
        arch = args.accuracy_arch
        lm, _ = bench.model(arch)
        names = lm.param_map.scorable()
        calib = random_windows(args.accuracy_windows, args.length, vocab(lm), seed=4)
        bs = args.score_batch
        device = next(lm.model.parameters()).device  # compared there: fast at 1.4B
        runs: dict[str, Any] = {
            "esa fp32, on device": dict(offload=False, checkpoint=True),
            "esa fp32, on device (again)": dict(offload=False, checkpoint=True),
            "esa fp32, offloaded to host": dict(offload=True, checkpoint=True),
            "esa bf16 (lean)": dict(score_dtype=torch.bfloat16, checkpoint=True),
            "plain bf16 .grad": None,
        }
        got: dict[str, Scores] = {}
        for label, options in runs.items():
            with sec.guard(label), deterministic():
                reset_peak()
                t = time.perf_counter()
                if options is None:
                    scores = plain_grad_x_weight(lm, calib, bs, names, keep=True) or {}
                else:
                    scores = compute_scores(
                        lm, "grad_x_weight", calib, batch_size=bs, progress=False, **options
                    )
                sync()
                got[label] = {n: v.float().to(device) for n, v in scores.items()}
                sec.data.setdefault("runs", {})[label] = {
                    "seconds": time.perf_counter() - t,
                    "peak_gib": peak_gpu_bytes() / GIB,
                    "host_scores_gib": host_bytes(lm, scores) / GIB,
                }
                del scores
                free_memory()
        ref: Scores = {}
        with sec.guard("fp32 reference"), fp32_model(lm.model), deterministic():
            scores = compute_scores(
                lm, "grad_x_weight", calib, batch_size=bs, progress=False, checkpoint=True
            )
            ref = {n: v.float().to(device) for n, v in scores.items()}
            del scores
        if len(got) < len(runs) or not ref:
            return
        a, again = got["esa fp32, on device"], got.pop("esa fp32, on device (again)")
        b = got["esa fp32, offloaded to host"]
        sec.data["offload_bitwise_equal"] = all(torch.equal(a[n], b[n]) for n in a)
        sec.data["offload_max_abs_diff"] = max(float((a[n] - b[n]).abs().max()) for n in a)
        sec.data["rerun_bitwise_equal"] = all(torch.equal(a[n], again[n]) for n in a)
        sec.data["rerun_max_abs_diff"] = max(float((a[n] - again[n]).abs().max()) for n in a)
        for label, scores in got.items():
            sec.row(
                arch=arch, variant=label, windows=int(calib.shape[0]), batch_size=bs, **agreement(scores, ref)
            )
        bench.drop_model()


def agreement(scores: Scores, ref: Scores, k: int = 100, k_global: int = 1000) -> dict[str, float]:
    """Per-tensor top-k overlap (mean, min), global top-k overlap and the median relative max error."""
    per = select(scores, k, "top", "per_layer", seed=0)
    per_ref = select(ref, k, "top", "per_layer", seed=0)
    overlaps = [
        len(set(per.indices[n].tolist()) & set(per_ref.indices[n].tolist())) / max(1, len(per_ref.indices[n]))
        for n in ref
    ]
    glob = select(scores, k_global, "top", "global", seed=0).overlap(
        select(ref, k_global, "top", "global", seed=0)
    )
    errors = [float((scores[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in ref]
    return {
        "topk_overlap_mean": statistics.fmean(overlaps),
        "topk_overlap_min": min(overlaps),
        "global_overlap": glob,
        "median_rel_max_err": statistics.median(errors),
    }


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels for the block (on CUDA: math attention, deterministic algorithms
    where they exist; cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts)."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(was)


@contextlib.contextmanager
def fp32_model(model: torch.nn.Module) -> Iterator[None]:
    """The model in fp32 (same values: bf16 -> fp32 is exact), TF32 off, for the block; back to
    its dtype after (fp32 -> bf16 of upcast values is exact too)."""
    dtype = next(model.parameters()).dtype
    tf32 = torch.backends.cuda.matmul.allow_tf32
    model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        model.to(dtype)
        free_memory()
