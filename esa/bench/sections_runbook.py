"""The ``runbook`` benchmark section: the research runbook v2 end to end
(``esa.runbook.experiment.run_experiment``, the ``esa run`` path) on one random-init architecture.

One run per selection mode (``--runbook-modes``, default per_layer then global), all on the model
loaded once and the same data, top-100 (``--runbook-topk``), seeds 0, 1, 2, the four perturbations, random_k and
bottom_k, every artifact written. The score cache is on (a fresh temporary directory), so the
first mode computes every (metric, seed) score set and the later modes select from the cached
ones, as a user's second ``esa run`` with another ``--mode`` does. The curvature metrics run with
the runbook's options ``curvature_calib_samples`` (``--runbook-curvature-calib``),
``hutchinson_samples`` and ``hessian_tensors`` (``--runbook-hessian-tensors``: the exact diagonal
needs a few small tensors; the default regex names the final norm). One row per mode, then a
plain-transformers evaluation of the same windows (``model(input_ids, labels=...)``) timed
against one esa evaluation, the part of the runbook that dominates its time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from esa.bench.baselines import plain_eval
from esa.bench.harness import RUNBOOK_PERTURBATIONS, Bench, Section, timed, vocab
from esa.data import random_data
from esa.evaluate import evaluate
from esa.runbook.config import CURVATURE
from esa.runbook.experiment import ExperimentConfig, run_experiment
from esa.util.runtime import GIB


def section_runbook(bench: Bench) -> None:
    """The runbook v2 (top-100, seeds 0,1,2, random_k and bottom_k) once per mode, end to end."""
    args = bench.args
    with bench.section("runbook") as sec:
        bench.drop_model()
        t = time.perf_counter()
        lm, load_s = bench.model(args.runbook_arch)
        data = random_data(vocab(lm), args.runbook_windows, 3 * args.runbook_calib, args.length, seed=5)
        setup_s = time.perf_counter() - t
        sec.data["configs"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, mode in enumerate(args.runbook_modes):
                t = time.perf_counter()
                config = _config(args, lm.name, mode, tmp)
                result = run_experiment(config, lm=lm, data=data)
                wall = time.perf_counter() - t + (setup_s if i == 0 else 0.0)
                sec.data["configs"][mode] = config.to_dict()
                sec.data.setdefault("timings", {})[mode] = result.timings
                sec.data.setdefault("curvature", {})[mode] = result.protocol.get("curvature")
                sec.data.setdefault("memory_gib", {})[mode] = {k: v / GIB for k, v in result.memory.items()}
                files = sorted(os.listdir(result.out_dir)) if result.out_dir else []
                sec.row(**_row(args, mode, result, wall, load_s if i == 0 else 0.0, files))
                print(f"[bench] runbook {mode}: {wall:.1f} s wall, {len(result.rows)} conditions", flush=True)
        with sec.guard("plain eval"):
            _plain_vs_esa(sec, lm, data, result.timings["eval_batch_size"])
    bench.drop_model()


def _config(args: Any, model: str, mode: str, tmp: str) -> ExperimentConfig:
    metrics = list(args.runbook_metrics)
    curvature = any(m in CURVATURE for m in metrics)
    return ExperimentConfig(
        model=model,
        out_dir=os.path.join(tmp, f"run-{mode}"),
        metrics=metrics,
        mode=mode,
        topk=args.runbook_topk,
        max_samples=args.runbook_windows,
        max_length=args.length,
        batch_size=8,
        calib_samples=args.runbook_calib,
        curvature_calib_samples=min(args.runbook_curvature_calib, args.runbook_calib) if curvature else None,
        hutchinson_samples=args.runbook_hutchinson_samples,
        hessian_tensors=args.runbook_hessian_tensors if "hessian_diag" in metrics else None,
        seeds=[0, 1, 2],
        perturbations=list(RUNBOOK_PERTURBATIONS),
        controls=["random_k", "bottom_k"],
        use_cache=True,
        cache_root=os.path.join(tmp, "cache"),
        progress=args.progress,
        compile=args.runbook_compile,
        score_dtype=args.runbook_score_dtype,
    )


def _row(args: Any, mode: str, result: Any, wall: float, load_s: float, files: list[str]) -> dict:
    timings = result.timings
    by_metric: dict[str, float] = {}
    for key, value in timings.items():
        if key.startswith("score_") and key.endswith("_s"):
            metric = key[len("score_") :].rsplit("_seed", 1)[0]
            by_metric[metric] = by_metric.get(metric, 0.0) + value
    evals = [r["seconds"] for r in result.rows if not r.get("eval_reused")]
    return dict(
        arch=args.runbook_arch,
        mode=mode,
        wall_s=wall,
        load_s=load_s,
        total_s=timings["total_s"],
        baseline_s=timings.get("baseline_s"),
        eval_windows=args.runbook_windows,
        calib_windows=args.runbook_calib,
        topk=args.runbook_topk,
        curvature_calib_windows=result.config.curvature_calib_samples,
        hutchinson_samples=args.runbook_hutchinson_samples,
        hessian_tensors=result.config.hessian_tensors,
        length=args.length,
        metrics=list(args.runbook_metrics),
        conditions=len(result.rows),
        evals_run=len(evals),
        evals_reused=timings.get("evals_reused"),
        eval_median_s=statistics.median(evals) if evals else None,
        eval_batch_size=timings.get("eval_batch_size"),
        baseline_tok_s=result.baseline["tokens_per_s"],
        peak_gib=max(result.memory.values()) / GIB if result.memory else 0.0,
        score_s=sum(by_metric.values()),
        score_s_by_metric=by_metric,
        perturb_eval_s=sum(v for k, v in timings.items() if k.startswith("perturb_")),
        artifacts=files,
    )


def _plain_vs_esa(sec: Section, lm: Any, data: Any, bs: int) -> None:
    """One evaluation of the runbook's windows: plain transformers against esa (median of 3)."""
    model, windows = lm.model, data.eval_ids
    plain_eval(model, windows[:bs], bs)  # warm-up
    plain_s, _ = timed(lambda: plain_eval(model, windows, bs), 3)
    esa_s, _ = timed(lambda: evaluate(model, windows, bs, progress=False), 3)
    sec.data["eval_plain_vs_esa"] = {
        "windows": int(windows.shape[0]),
        "batch_size": int(bs),
        "plain_s": plain_s,
        "esa_s": esa_s,
        "plain_tok_s": windows.numel() / plain_s,
        "esa_tok_s": windows.numel() / esa_s,
    }
