"""The research runbook as one library call: baseline -> scores per seed -> selections ->
perturb super / controls -> ΔPPL per condition and seed -> artifacts.

``run_experiment(config)`` validates everything it can before loading anything, loads the model
once, and writes its artifacts through :mod:`esa.runbook.artifacts` (atomically: no partial out-dir).
The super set is the top-k by score; the controls (random_k, bottom_k) are drawn per perturbation
among the entries it actually changes (``esa.perturb.changeable``: bottom-k of |w·g| on a
dequantized 4-bit model would otherwise be exact zeros), and ``protocol`` records how many
entries each control excluded and how much the seeds' calibration sets overlap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esa.data import prepare_data
from esa.eligibility import Eligibility
from esa.errors import ConfigError
from esa.evaluate import auto_batch_size, evaluate
from esa.metrics import cached_scores
from esa.metrics.cache_store import usage
from esa.metrics.candidates import histogram_values, summary_of
from esa.models import LoadedModel, load_model
from esa.perturb import PERTURBATIONS, bit_position, changeable, perturbed
from esa.runbook import artifacts, curvature
from esa.runbook.config import CONTROLS, SCORE_DTYPES, ExperimentConfig
from esa.runbook.extras import Extras
from esa.runbook.summary import summarize
from esa.select import select
from esa.util.runtime import peak_gpu_bytes, reset_peak

log = logging.getLogger("esa")


@dataclass
class ExperimentResult:
    """What a run measured; ``rows`` has one dict per (perturbation, condition, metric, seed)."""

    config: ExperimentConfig
    model: dict
    data: dict
    baseline: dict
    rows: list[dict]
    summary: list[dict]
    stability: dict | None
    selections: dict  # (metric, seed) -> Selection of the super set
    timings: dict
    score_summaries: dict
    out_dir: Path | None = None
    memory: dict = field(default_factory=dict)  # peak accelerator bytes per phase
    protocol: dict = field(default_factory=dict)  # calibration overlap, control exclusions, options
    extras: Extras | None = None  # the old runner's optional analyses (esa.runbook.extras)


def run_experiment(config: ExperimentConfig, lm: LoadedModel | None = None, data=None) -> ExperimentResult:
    """Run the runbook; write artifacts when ``config.out_dir`` is set."""
    config.validate()
    extras = Extras.prepare(config)
    staging = artifacts.Staging(config.out_dir, config.overwrite) if config.out_dir else None
    try:
        timings: dict = {}
        memory: dict = {}
        t0 = time.perf_counter()
        if lm is None:
            lm = load_model(
                config.model, dtype=config.dtype, device=config.device, device_map=config.device_map
            )
        timings["load_s"] = time.perf_counter() - t0
        memory["load"] = _peak_and_reset()
        names = lm.param_map.scorable(config.include_embeddings, config.include_norms)
        names_by = curvature.metric_names(config, lm, names)
        for scored in {tuple(v) for v in names_by.values()} or {tuple(names)}:
            _check_topk(config, lm, list(scored))
            _check_bit(config, lm, list(scored))
        n_calib = config.calib_windows()
        if data is None:
            data = prepare_data(
                lm.tokenizer,
                config.data_file,
                config.calib_file,
                config.max_length,
                config.max_samples,
                calib_windows=n_calib,
                bos=config.bos,
            )
        protocol = {
            "calibration_overlap": data.calibration_overlap(n_calib, config.seeds),
            "curvature": curvature.protocol(config, lm, data, names_by),
        }
        eval_bs = config.eval_batch_size or auto_batch_size(
            lm.model, int(data.eval_ids.shape[0]), int(data.eval_ids.shape[1]), config.batch_size
        )
        timings["eval_batch_size"] = eval_bs
        evaluator = functools.partial(
            evaluate, lm.model, data.eval_ids, eval_bs, config.progress, compile=config.compile
        )
        t = time.perf_counter()
        base = evaluator(check_leak=True, desc="baseline")
        timings["baseline_s"] = time.perf_counter() - t
        memory["baseline"] = _peak_and_reset()
        extras.baseline(lm)
        scores_by: dict = {}
        selections: dict = {}
        rows: list[dict] = []
        summaries: dict = {}
        memo: dict = {}
        steps = [(metric, seed) for metric in config.metrics for seed in config.seeds]
        for metric, seed in tqdm(steps, desc="runbook", disable=not config.progress, unit="step"):
            t = time.perf_counter()
            scores = scores_for(lm, data, metric, seed, config, names_by[metric], full=extras.needs_scores)
            timings[f"score_{metric}_seed{seed}_s"] = time.perf_counter() - t
            memory[f"score_{metric}_seed{seed}"] = _peak_and_reset()
            if seed == config.seeds[0]:
                summaries[metric] = summary_of(scores)
                if config.save_plots:  # kept for the plots only, off the accelerator
                    scores_by[metric] = histogram_values(scores)
            rows += _perturbation_rows(
                lm, data, base, scores, metric, seed, config, selections, timings, evaluator, memo, extras
            )
            extras.on_scores(lm, data, scores, selections[(metric, seed)])
            memory[f"perturb_{metric}_seed{seed}"] = _peak_and_reset()
            del scores  # free before the next scores are built
        extras.finish(lm, data, selections)
        stability = _stability(config, selections) if config.stability_check else None
        summary = summarize(rows, base.window_nll)
        protocol.update(_options_and_exclusions(config, rows), score_cache=usage(config.cache_root))
        result = ExperimentResult(
            config,
            lm.describe(),
            data.manifest(),
            base.to_dict(),
            rows,
            summary,
            stability,
            selections,
            timings,
            summaries,
            memory=memory,
            protocol=protocol,
            extras=extras,
        )
        timings["evals_reused"] = sum(1 for r in rows if r.get("eval_reused"))
        timings["total_s"] = time.perf_counter() - t0
        if staging is not None:
            artifacts.write_all(staging, result, lm, scores_by)
            result.out_dir = staging.commit()
        timings["total_s"] = time.perf_counter() - t0
        return result
    finally:
        if staging is not None:
            staging.discard()


def _check_topk(config: ExperimentConfig, lm: LoadedModel, names: list[str]) -> None:
    sizes = {n: lm.param_map[n].numel for n in names}
    if not sizes:
        raise ConfigError(f"model {lm.name!r} has no tensors to score with these include options")
    if config.mode == "per_layer":
        small = min(sizes, key=lambda n: sizes[n])
        if config.topk > sizes[small]:
            raise ConfigError(
                f"--topk {config.topk} is larger than tensor {small} ({sizes[small]} entries): "
                "lower --topk or use --mode global"
            )
    elif config.topk > sum(sizes.values()):
        raise ConfigError(f"--topk {config.topk} is larger than all {sum(sizes.values())} scored weights")


def _check_bit(config: ExperimentConfig, lm: LoadedModel, names: list[str]) -> None:
    """--perturb-bit must exist in every scored dtype (checked before the baseline runs)."""
    if config.perturb_bit is not None and any(PERTURBATIONS[m].uses_bit for m in config.methods()):
        named = dict(lm.model.named_parameters())
        for dtype in {named[n].dtype for n in names}:
            bit_position(config.perturb_bit, dtype)


def scores_for(lm: LoadedModel, data, metric: str, seed: int, config: ExperimentConfig, names, full=False):
    """Scores of ``metric`` for ``seed``'s calibration windows (``config.windows_for(metric)``),
    from the cache when valid: candidates for top-k selections (``esa.metrics.candidates``), the
    whole tensors when ``full``."""
    return cached_scores(
        lm,
        data,
        metric,
        seed,
        calib_windows=config.windows_for(metric),
        batch_size=config.batch_size,
        hutchinson_samples=config.hutchinson_samples,
        names=names,
        use_cache=config.use_cache,
        cache_root=config.cache_root,
        progress=config.progress,
        score_dtype=SCORE_DTYPES[config.score_dtype],
        memory_limit=None if config.memory_limit is None else int(config.memory_limit * 2**30),
        full=full,
        max_k=config.topk,
    )


def _perturbation_rows(
    lm, data, base, scores, metric, seed, config, selections, timings, evaluator=None, memo=None, extras=None
) -> list[dict]:
    if evaluator is None:
        evaluator = functools.partial(evaluate, lm.model, data.eval_ids, config.batch_size, config.progress)
    memo = {} if memo is None or not config.reuse_evals else memo
    sets = {"super": select(scores, config.topk, "top", config.mode, seed=seed, metric=metric)}
    selections[(metric, seed)] = sets["super"]
    rows = []
    for method in config.methods():
        eligible = _eligible(lm, method, list(scores), config, memo)
        for control in config.controls:
            kind = CONTROLS[control]
            if kind == "random":  # no score enters the draw: the same for every metric
                key = ("random", eligible.digest if eligible else None, seed, tuple(scores))
                if key not in memo:
                    memo[key] = select(scores, config.topk, kind, config.mode, seed, metric, eligible)
                sets[control] = memo[key]
            else:
                sets[control] = select(scores, config.topk, kind, config.mode, seed, metric, eligible)
        for condition, selection in sets.items():
            t = time.perf_counter()
            key = _condition_key(selection, method, seed, config)
            reused = key in memo
            if reused:  # the same entries perturbed the same way: the same model, the same numbers
                res, n_changed, verified, tasks = memo[key]
            else:
                with perturbed(
                    lm.model,
                    selection,
                    method,
                    scale=config.scale_for(method),
                    prob=config.prob_for(method),
                    bit=config.perturb_bit,
                    seed=seed,
                ) as info:
                    res = evaluator(desc=f"{method}/{condition}/seed{seed}")
                    tasks = extras.on_perturbed(lm) if extras is not None and extras.tasks else {}
                n_changed, verified = int(info.n_changed), bool(info.verified)
                memo[key] = (res, n_changed, verified, tasks)
            seconds = time.perf_counter() - t
            timings[f"perturb_{metric}_{method}_{condition}_seed{seed}_s"] = seconds
            rows.append(
                {
                    "metric": metric,
                    "perturbation": method,
                    "condition": condition,
                    "seed": int(seed),
                    "k": int(config.topk),
                    "mode": config.mode,
                    "n_weights": int(selection.size),
                    "n_excluded": int(selection.excluded),
                    "n_changed": n_changed,
                    "prob": config.prob_for(method),
                    "bit": _bit_of(config, method),
                    "ppl": res.ppl,
                    "delta_ppl": res.ppl - base.ppl,
                    "ppl_ratio": res.ppl / base.ppl,
                    "accuracy": res.accuracy,
                    "delta_accuracy": res.accuracy - base.accuracy,
                    "finite": res.finite,
                    "restored_bit_exact": verified,
                    "seconds": seconds,
                    "eval_reused": reused,
                    "window_nll": list(res.window_nll),
                    **tasks,
                }
            )
    return rows


def _eligible(lm, method: str, names: list[str], config: ExperimentConfig, memo: dict):
    """The entries the controls draw from: ``changeable(...)`` frozen once per run and method
    (`esa.eligibility.Eligibility`: the excluded positions only; the weights are restored
    bit-exact after each perturbation), or None (every entry: the same selections without a
    mask) when ``method`` changes every scored entry (bit_flip always; the others where no
    weight is zero). random_k selections are kept in ``memo`` by the eligibility's digest, for
    every metric and every method that excludes the same entries (``_perturbation_rows``)."""
    if PERTURBATIONS[method].changes is None:
        return None
    key = ("eligible", method, config.scale_for(method), tuple(names))
    if key not in memo:
        memo[key] = Eligibility.of(changeable(lm.model, method, names, config.scale_for(method)))
    return memo[key] or None


def _condition_key(selection, method: str, seed: int, config: ExperimentConfig) -> tuple:
    """What determines a perturbed model: the entries, the method and its options, and the seed
    only where the method draws random numbers (gauss_noise, or prob < 1)."""
    digest = hashlib.sha256()
    for name in sorted(selection.indices):
        idx = selection.indices[name]
        if idx.numel():
            digest.update(name.encode())
            digest.update(idx.to(torch.int64).contiguous().numpy().tobytes())
    seeded = PERTURBATIONS[method].random or config.prob_for(method) < 1.0
    return (
        digest.hexdigest(),
        method,
        config.scale_for(method),
        config.prob_for(method),
        config.perturb_bit,
        int(seed) if seeded else None,
    )


def _bit_of(config: ExperimentConfig, method: str) -> int | str | None:
    """--perturb-bit where ``method`` flips a bit (None: the exponent MSB), else None."""
    return config.perturb_bit if PERTURBATIONS[method].uses_bit else None


def _options_and_exclusions(config: ExperimentConfig, rows: list[dict]) -> dict:
    """Each perturbation's resolved options, and the entries each control could not draw from
    (not changed by the perturbation; the same for every metric and seed)."""
    options = {
        m: {"scale": config.scale_for(m), "prob": config.prob_for(m), "bit": _bit_of(config, m)}
        for m in config.methods()
    }
    excluded: dict = {}
    for r in rows:
        if r["condition"] != "super":
            excluded.setdefault(r["perturbation"], {})[r["condition"]] = r["n_excluded"]
    return {"perturbation_options": options, "controls_excluded": excluded}


def _stability(config: ExperimentConfig, selections: dict) -> dict:
    out: dict = {"metrics": {}}
    for metric in config.metrics:
        pairs = []
        seeds = config.seeds
        for i, a in enumerate(seeds):
            for b in seeds[i + 1 :]:
                pairs.append(
                    {
                        "seed_a": a,
                        "seed_b": b,
                        "jaccard": selections[(metric, a)].jaccard(selections[(metric, b)]),
                    }
                )
        values = [p["jaccard"] for p in pairs]
        out["metrics"][metric] = {
            "pairs": pairs,
            "mean_jaccard": sum(values) / len(values) if values else None,
            "min_jaccard": min(values) if values else None,
            "k": config.topk,
            "mode": config.mode,
        }
    return out


def _peak_and_reset() -> int:
    """Peak accelerator memory (bytes, summed over GPUs) since the last reset; 0 without CUDA."""
    peak = peak_gpu_bytes()
    reset_peak()
    return peak
