"""Benchmark sections of the curvature metrics (random-init published architectures):

- ``hutchinson``: hutchinson_diag with 1 and 2 Rademacher probes over ``--hutchinson-windows``
  windows under a hard ``--hutchinson-limit-gb`` device cap (80 GB: one H100):
  seconds per probe = t₂ − t₁, fixed = t₁ − per probe; peak memory; the plan (windows per
  double-backward term, accumulators offloaded to host memory or not);
- ``hessian``: exact hessian_diag. The whole metric on the smallest tensor of the last decoder
  layer (its double-backward graph spans one layer and the head), and the cost of one batched
  Hessian-vector product of 128 unit vectors on the smallest tensor of layer 0 (whose graph spans
  the whole model): seconds per HVP there; peak memory of each.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from esa.bench.harness import Bench, Section, vocab
from esa.bench.sections_scoring import device_cap
from esa.data import random_windows
from esa.evaluate import lm_loss
from esa.metrics import curvature
from esa.metrics.registry import compute_scores, grad_scope
from esa.models import LoadedModel
from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, reset_peak, sync


def section_hutchinson(bench: Bench) -> None:
    """Per architecture: hutchinson_diag with 1 and 2 probes, timed after an untimed warm-up."""
    args = bench.args
    with bench.section("hutchinson") as sec:
        for arch in args.hutchinson_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            with sec.guard(arch):
                _hutchinson_arch(bench, sec, arch)
            bench.drop_model()


def _hutchinson_arch(bench: Bench, sec: Section, arch: str) -> None:
    """Auto plan under the cap; if that runs out of memory, once more with every accumulator
    offloaded to host memory (both rows recorded)."""
    args = bench.args
    lm, _ = bench.model(arch)
    calib = random_windows(args.hutchinson_windows, args.length, vocab(lm), seed=3)
    with sec.guard(f"{arch} plain double backward"):
        _plain_hutchinson(bench, sec, lm, arch, calib)
    free_memory()
    for offload in (None, True):
        failed = False
        try:
            _hutchinson_run(bench, sec, lm, arch, calib, offload)
        except torch.OutOfMemoryError as exc:
            sec.error(f"{arch} offload={offload}", exc)
            failed = True
        free_memory()  # outside the handler: the traceback no longer holds the graph
        if not failed:
            return


def _hutchinson_run(
    bench: Bench, sec: Section, lm: LoadedModel, arch: str, calib: torch.Tensor, offload: bool | None
) -> None:
    args = bench.args
    n = int(calib.shape[0])
    out: dict[str, Any] = {"arch": arch, "windows": n, "length": args.length, "offload": offload}
    out["variant"] = "esa (lean)" if offload is None else "esa (lean), every accumulator offloaded"
    out["limit_gb"] = args.hutchinson_limit_gb if torch.cuda.is_available() else None
    times = {}
    with device_cap(out["limit_gb"]) as limit:
        common: dict[str, Any] = dict(batch_size=n, progress=False, memory_limit=limit, offload=offload)
        compute_scores(lm, "hutchinson_diag", calib[:1], hutchinson_samples=1, **common)  # warm-up
        free_memory()
        for samples in (1, 2):
            reset_peak()
            report: dict[str, Any] = {}
            t = time.perf_counter()
            s = compute_scores(
                lm, "hutchinson_diag", calib, hutchinson_samples=samples, report=report, **common
            )
            sync()
            times[samples] = time.perf_counter() - t
            out[f"finite_{samples}_samples"] = all(bool(torch.isfinite(v).all()) for v in s.values())
            del s
            out[f"seconds_{samples}_samples"] = times[samples]
            out[f"peak_gib_{samples}_samples"] = peak_gpu_bytes() / GIB
            out["plan"] = report.get("memory_plan")
            free_memory()
            if sec.left() < 5:
                break
    if 2 in times:
        out["seconds_per_sample"] = times[2] - times[1]
        out["fixed_seconds"] = times[1] - out["seconds_per_sample"]
        out["seconds_per_sample_per_window"] = out["seconds_per_sample"] / n
    probes = lm.model.__dict__.get("_esa_activation_probe", {})
    out["activation_probe_gib"] = {str(k): [v / GIB for v in vals] for k, vals in probes.items()}
    out["weights_gib"] = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / GIB
    sec.row(**out)
    print(f"[bench] hutchinson {arch}: {out}", flush=True)


def _plain_hutchinson(bench: Bench, sec: Section, lm: LoadedModel, arch: str, calib: torch.Tensor) -> None:
    """The textbook way, for comparison: ``autograd.grad(create_graph=True)`` over every scored
    weight, the whole gradient, probe and Hz kept (``hutchinson_diag(method="retained")``), 1 probe, under
    the same cap."""
    model: Any = lm.model
    named = dict(model.named_parameters())
    params = [named[n] for n in lm.param_map.scorable()]
    device = model.get_input_embeddings().weight.device
    batch = calib.to(device)
    with (
        device_cap(bench.args.hutchinson_limit_gb),
        grad_scope(model, params),
        curvature.eager_kernels(model),
    ):
        reset_peak()
        t = time.perf_counter()
        try:
            est = curvature.hutchinson_diag([lambda: lm_loss(model, batch)], params, 1, 0, method="retained")
            del est
            error = None
        except torch.OutOfMemoryError as exc:
            error = str(exc).splitlines()[0][:120]
        sync()
        secs = time.perf_counter() - t
    sec.row(
        arch=arch,
        variant="plain double backward (create_graph, whole g, z, Hz kept)",
        windows=int(calib.shape[0]),
        length=bench.args.length,
        limit_gb=bench.args.hutchinson_limit_gb if torch.cuda.is_available() else None,
        seconds_1_samples=None if error else secs,
        peak_gib_1_samples=peak_gpu_bytes() / GIB,
        error=error,
    )


def section_hessian(bench: Bench) -> None:
    """Per architecture: exact hessian_diag on a last-layer tensor, batched HVPs on a layer-0 one."""
    args = bench.args
    with bench.section("hessian") as sec:
        for arch in args.hessian_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            lm, _ = bench.model(arch)
            calib = random_windows(1, args.length, vocab(lm), seed=8)
            with sec.guard(f"{arch} whole metric"), device_cap(args.hutchinson_limit_gb):
                _hessian_metric(sec, lm, arch, calib)
            free_memory()
            with sec.guard(f"{arch} batched HVP"), device_cap(args.hutchinson_limit_gb):
                _hessian_hvp(sec, lm, arch, calib)
            free_memory()
            bench.drop_model()


def smallest_tensor(lm: LoadedModel, layer: int) -> str:
    """The scorable-or-norm tensor of decoder layer ``layer`` with the fewest entries."""
    infos = [(n, i) for n, i in lm.param_map.infos.items() if i.layer == layer]
    return min(infos, key=lambda item: item[1].numel)[0]


def _hessian_metric(sec: Section, lm: LoadedModel, arch: str, calib: torch.Tensor) -> None:
    name = smallest_tensor(lm, lm.param_map.num_layers() - 1)
    reset_peak()
    t = time.perf_counter()
    scores = compute_scores(lm, "hessian_diag", calib, names=[name], batch_size=1, progress=False)
    sync()
    secs = time.perf_counter() - t
    entries = scores[name].numel()
    sec.row(
        arch=arch,
        part="hessian_diag (whole metric)",
        tensor=name,
        entries=entries,
        windows=int(calib.shape[0]),
        seconds=secs,
        seconds_per_hvp=secs / entries,
        peak_gib=peak_gpu_bytes() / GIB,
        finite=bool(torch.isfinite(scores[name]).all()),
    )


def _hessian_hvp(sec: Section, lm: LoadedModel, arch: str, calib: torch.Tensor, chunk: int = 128) -> None:
    """Batched Hessian-vector products of unit vectors on the smallest tensor of layer 0 (the inner
    step of ``curvature.hessian_diag``, with its halving of the batch while it runs out of
    memory): the second block that fits is timed."""
    name = smallest_tensor(lm, 0)
    model: Any = lm.model
    param = dict(model.named_parameters())[name]
    device = model.get_input_embeddings().weight.device
    diag = torch.zeros(param.numel(), dtype=torch.float64)
    chunk = max(1, min(chunk, param.numel() // 2))
    reset_peak()
    times: list[float] = []
    with grad_scope(model, [param]), curvature.eager_kernels(model):
        t = time.perf_counter()
        grads = curvature._grads(lm_loss(model, calib.to(device)), [param], create_graph=True)
        sync()
        graph_s = time.perf_counter() - t
        start = 0
        while len(times) < 2 and start + chunk <= param.numel():
            oom = False
            sync()
            t = time.perf_counter()
            try:
                curvature._diagonal_block(
                    diag, grads, [param], [0, param.numel()], start, start + chunk, True
                )
                sync()
                times.append(time.perf_counter() - t)
                start += chunk
            except torch.OutOfMemoryError:
                oom = True
            if oom:
                chunk //= 2
                free_memory()
        del grads
    sec.row(
        arch=arch,
        part=f"batched HVP ({chunk} unit vectors)",
        tensor=name,
        entries=param.numel(),
        windows=int(calib.shape[0]),
        chunk=chunk,
        graph_seconds=graph_s,
        seconds=times[-1],
        seconds_per_hvp=times[-1] / chunk,
        projected_tensor_s=graph_s + times[-1] * param.numel() / chunk,
        peak_gib=peak_gpu_bytes() / GIB,
    )
