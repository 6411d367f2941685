"""Benchmark sections on random-init models of the published architectures (esa.models.archs):

- ``env``: versions, GPUs, a bf16 GEMM and a copy as the machine's ceilings;
- ``eval``: evaluation forward (tokens/s, MFU against 2·params·tokens, peak memory), plain
  transformers (``model(input_ids, labels=...)``, bf16, sdpa) vs ``esa.evaluate.evaluate``;
- ``runbook``: the research runbook v2 end to end (esa.bench.sections_runbook);
- ``multi``: a model split over several GPUs (Mixtral-8x7B): evaluation and grad_x_weight scoring;
- ``score``, ``select``, ``perturb``: esa.bench.sections_scoring; ``accuracy``:
  esa.bench.sections_accuracy; ``hutchinson``, ``hessian``: esa.bench.sections_curvature.

``RUNNERS`` maps each section name to its function ``(bench) -> None``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from esa.analyses.detect import detect_super_weights
from esa.bench.baselines import plain_eval
from esa.bench.harness import Bench, Section, mfu, timed, vocab
from esa.bench.sections_accuracy import section_accuracy
from esa.bench.sections_curvature import section_hessian, section_hutchinson
from esa.bench.sections_runbook import section_runbook
from esa.bench.sections_scoring import section_score, section_select_perturb
from esa.data import random_windows
from esa.evaluate import auto_batch_size, evaluate, use_compile
from esa.metrics.registry import compute_scores
from esa.models import LoadedModel
from esa.perturb import perturbed
from esa.runbook.config import SCORE_DTYPES
from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, peaks_per_gpu, reset_peak, sync


def section_env(bench: Bench) -> None:
    """Versions and GPUs; on CUDA the measured bf16 GEMM TFLOP/s (8192³, x20) and copy GB/s (1 GiB)."""
    import transformers

    with bench.section("env") as sec:
        info: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "platform": platform.platform(),
            "gpus": [],
            "date": datetime.date.today().isoformat(),
        }
        with contextlib.suppress(Exception):
            import accelerate

            info["accelerate"] = accelerate.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpu_memory_gib"] = [
                round(torch.cuda.get_device_properties(i).total_memory / GIB, 1)
                for i in range(torch.cuda.device_count())
            ]
            with sec.guard("gemm"):
                n = 8192
                a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    a @ b
                secs, _ = timed(lambda: [a @ b for _ in range(20)], repeats=3)
                info["gemm_bf16_tflops"] = round(2 * n**3 * 20 / secs / 1e12, 1)
                x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
                y = torch.empty_like(x)
                secs, _ = timed(lambda: [y.copy_(x) for _ in range(10)], repeats=3)
                info["copy_gb_s"] = round(2 * (1 << 30) * 10 / secs / 1e9, 1)
                del a, b, x, y
        sec.data["info"] = info
        bench.results["meta"]["env"] = info


def section_eval(bench: Bench) -> None:
    """Per architecture: plain transformers, esa eager and esa default (compiled on CUDA)."""
    with bench.section("eval") as sec:
        for arch in bench.args.eval_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            with sec.guard(arch):
                _eval_arch(bench, sec, arch)
            bench.drop_model()


def _eval_arch(bench: Bench, sec: Section, arch: str) -> None:
    args = bench.args
    lm, load_s = bench.model(arch)
    model: Any = lm.model
    params = lm.num_parameters
    n = args.eval_windows if "1.4b" not in arch else 2 * args.eval_windows
    windows = random_windows(n, args.length, vocab(lm), seed=1)
    bs = auto_batch_size(model, n, args.length, 8)
    tokens = windows.numel()
    row: dict[str, Any] = {
        "arch": arch,
        "params": params,
        "load_s": round(load_s, 2),
        "windows": n,
        "length": args.length,
        "batch_size": bs,
        "attn": getattr(model.config, "_attn_implementation", None),
    }
    # plain transformers (labels: the upcast full-logits loss)
    plain_eval(model, windows[:bs], bs)  # warm-up
    base = reset_peak()
    secs, plain_loss = timed(functools.partial(plain_eval, model, windows, bs), args.repeats)
    row.update(
        plain_tok_s=tokens / secs,
        plain_peak_gib=(peak_gpu_bytes() - 0) / GIB,
        plain_extra_gib=(peak_gpu_bytes() - base) / GIB,
        plain_loss=plain_loss,
    )
    # plain forward without labels (logits only), for reference
    reset_peak()
    secs, _ = timed(functools.partial(plain_eval, model, windows, bs, labels=False), args.repeats)
    row.update(plain_logits_tok_s=tokens / secs)
    # esa, eager
    evaluate(model, windows[:bs], bs, progress=False, compile=False)  # warm-up
    eager = functools.partial(evaluate, model, windows, bs, progress=False, compile=False)
    secs, res = timed(eager, args.repeats)
    row.update(
        esa_eager_tok_s=tokens / secs,
        esa_eager_peak_gib=res.peak_memory_bytes / GIB,
        esa_eager_nll_diff=abs(res.nll - plain_loss),
    )
    # esa, its default (compiled on CUDA for models >= 100M params)
    row["esa_compiled"] = use_compile(model, None)
    t = time.perf_counter()
    evaluate(model, windows[:bs], bs, progress=False)  # warm-up (compiles)
    sync()
    row["warmup_s"] = time.perf_counter() - t
    secs, res = timed(functools.partial(evaluate, model, windows, bs, progress=False), args.repeats)
    row.update(
        esa_tok_s=tokens / secs,
        esa_peak_gib=res.peak_memory_bytes / GIB,
        esa_nll=res.nll,
        nll_abs_diff=abs(res.nll - plain_loss),
    )
    row["compile_failed"] = bool(model.__dict__.get("_esa_compile_failed"))
    row["ratio"] = row["esa_tok_s"] / row["plain_tok_s"]
    row["eager_ratio"] = row["esa_eager_tok_s"] / row["plain_tok_s"]
    row["plain_mfu"] = mfu(params, row["plain_tok_s"])
    row["esa_mfu"] = mfu(params, row["esa_tok_s"])
    if row["esa_compiled"]:
        with sec.guard(f"{arch} compiled sees perturbations"):
            row["compiled_sees_perturbation"] = compiled_sees_perturbation(lm, windows[:bs], bs)
    sec.row(**row)
    print(
        f"[bench] eval {arch}: plain {row['plain_tok_s']:.0f} esa {row['esa_tok_s']:.0f} tok/s "
        f"(x{row['ratio']:.2f}; compiled={row['esa_compiled']}) eager {row['esa_eager_tok_s']:.0f}",
        flush=True,
    )


def compiled_sees_perturbation(lm: LoadedModel, windows: torch.Tensor, bs: int) -> dict[str, Any]:
    """Scale one MLP weight x300 in place: compiled and eager evaluation must both see it, equally
    (ok: eager moved, |compiled - eager| < 0.25·|eager - base|, restored within 1e-6)."""
    name = next(n for n in lm.param_map.scorable() if lm.param_map[n].component == "mlp_down")
    numel = dict(lm.model.named_parameters())[name].numel()
    base = evaluate(lm.model, windows, bs, progress=False).nll
    with perturbed(lm.model, {name: torch.arange(numel)}, "scale", scale=300.0):
        compiled = evaluate(lm.model, windows, bs, progress=False, compile=True).nll
        eager = evaluate(lm.model, windows, bs, progress=False, compile=False).nll
    after = evaluate(lm.model, windows, bs, progress=False).nll
    return {
        "tensor": name,
        "base": base,
        "compiled": compiled,
        "eager": eager,
        "restored": after,
        "ok": abs(eager - base) > 1e-4
        and abs(compiled - eager) < 0.25 * abs(eager - base)
        and abs(after - base) < 1e-6,
    }


def section_multi(bench: Bench) -> None:
    """A model split over all visible GPUs (device_map="auto"; ``--multi-min-gpus``, default 2):
    evaluation, plain vs esa, the super-weight detector, act_mag and grad_x_weight scoring in bf16
    and fp32; peak memory per GPU."""
    args = bench.args
    with bench.section("multi") as sec:
        n_gpu = torch.cuda.device_count()
        sec.data["gpus"] = n_gpu
        if n_gpu < args.multi_min_gpus:
            sec.error(args.multi_arch, RuntimeError(f"needs {args.multi_min_gpus}+ GPUs, {n_gpu} visible"))
            return
        bench.drop_model()
        lm, load_s = bench.model(args.multi_arch, device_map="auto")
        model: Any = lm.model
        sec.data["device_map"] = sorted({str(p.device) for p in model.parameters()})
        sec.data["weights_gib_per_gpu"] = [
            round(torch.cuda.memory_allocated(i) / GIB, 2) for i in range(n_gpu)
        ]
        n = args.multi_windows
        windows = random_windows(n, args.length, vocab(lm), seed=6)
        bs = auto_batch_size(model, n, args.length, 8)
        tokens = windows.numel()
        with sec.guard("eval"):
            plain_eval(model, windows[:bs], bs)
            reset_peak()
            secs, plain_loss = timed(lambda: plain_eval(model, windows, bs), 1)
            plain: dict[str, Any] = {"tok_s": tokens / secs, "peak_gib_per_gpu": peaks_per_gpu()}
            evaluate(model, windows[:bs], bs, progress=False)
            reset_peak()
            secs, res = timed(lambda: evaluate(model, windows, bs, progress=False), 1)
            sec.row(
                arch=args.multi_arch,
                part="eval",
                params=lm.num_parameters,
                load_s=load_s,
                windows=n,
                batch_size=bs,
                plain_tok_s=plain["tok_s"],
                plain_peak_gib_per_gpu=plain["peak_gib_per_gpu"],
                esa_tok_s=tokens / secs,
                esa_peak_gib_per_gpu=peaks_per_gpu(),
                ratio=tokens / secs / plain["tok_s"],
                nll_abs_diff=abs(res.nll - plain_loss),
            )
        with sec.guard("detect"):
            _multi_detect(sec, args.multi_arch, lm, random_windows(1, args.length, vocab(lm), seed=8))
        calib = random_windows(args.multi_calib, args.length, vocab(lm), seed=7)
        for metric, dtype in multi_scores(args.multi_scores):
            if sec.left() < 30:
                break
            with sec.guard(f"{metric} {dtype}"):
                _multi_scores(bench, sec, lm, calib, metric, dtype)
            free_memory()
    bench.drop_model()


def multi_scores(spec: str) -> list[tuple[str, torch.dtype]]:
    """``"act_mag:bf16,grad_x_weight:fp32"`` -> [(metric, score dtype), ...].

    >>> multi_scores("act_mag:bf16,grad_x_weight:fp32")
    [('act_mag', torch.bfloat16), ('grad_x_weight', torch.float32)]
    """
    return [(m, SCORE_DTYPES[d]) for m, d in (item.split(":") for item in spec.split(",") if item)]


def _multi_detect(sec: Section, arch: str, lm: LoadedModel, window: torch.Tensor) -> None:
    """The super-weight detector (``esa.analyses.detect``) on one window: time, peak, candidates."""
    reset_peak()
    secs, report = timed(lambda: detect_super_weights(lm, window), 1)
    sec.row(
        arch=arch,
        part="detect",
        tokens=int(window.numel()),
        seconds=secs,
        peak_gib_per_gpu=peaks_per_gpu(),
        layers_observed=len(report.layers),
        candidates=len(report.candidates),
    )


def _multi_scores(
    bench: Bench, sec: Section, lm: LoadedModel, calib: torch.Tensor, metric: str, dtype: torch.dtype
) -> None:
    args = bench.args
    reset_peak()
    t = time.perf_counter()
    scores = compute_scores(lm, metric, calib, batch_size=args.score_batch, progress=False, score_dtype=dtype)
    sync()
    secs = time.perf_counter() - t
    finite = all(bool(torch.isfinite(s).all()) for s in scores.values())
    del scores
    sec.row(
        arch=args.multi_arch,
        part=f"{metric} {str(dtype).replace('torch.', '')}",
        windows=int(calib.shape[0]),
        batch_size=args.score_batch,
        seconds=secs,
        tok_s=calib.numel() / secs,
        peak_gib_per_gpu=peaks_per_gpu(),
        finite=finite,
    )


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "env": section_env,
    "eval": section_eval,
    "score": section_score,
    "accuracy": section_accuracy,
    "hutchinson": section_hutchinson,
    "hessian": section_hessian,
    "select": section_select_perturb,
    "perturb": section_select_perturb,
    "runbook": section_runbook,
    "multi": section_multi,
}
