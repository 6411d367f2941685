"""A memoizing session object for claim suites: each model is loaded once, and its data,
baseline, scores, selections and perturbation results are computed once and reused.

The pytest plugin exposes one per session (fixture ``esa_workbench``; not the speed benchmark
``esa.bench``); tests are grouped by model on xdist workers, so a worker loads each of its models
once.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from esa.claims.tiers import Tier
from esa.perturb import resolve_scale

if TYPE_CHECKING:
    from esa.models import LoadedModel

log = logging.getLogger("esa")


@dataclass(frozen=True)
class Condition:
    """One perturbed evaluation: which set, which perturbation, which seed.

    ``scale=None`` takes the perturbation's registered default (``esa.perturb.resolve_scale``:
    gauss_noise σ = 0.01 x |w|), so equal conditions compare (and memoize) equal."""

    metric: str
    seed: int
    kind: str  # "top" | "random" | "bottom"
    perturbation: str
    mode: str = "per_layer"
    k: int | None = None
    scale: float | None = None
    prob: float = 1.0
    include_embeddings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", resolve_scale(self.perturbation, self.scale))


class Workbench:
    """Lazily computed, memoized measurements for the models of one session."""

    def __init__(
        self,
        tier: Tier,
        device=None,
        data=None,
        calib_data=None,
        progress: bool = False,
        keep_models: int = 1,
        keep_scores: int = 3,
    ):
        self.tier, self.device, self.data_spec, self.calib_spec = tier, device, data, calib_data
        self.progress, self.keep_models = progress, keep_models
        self._models: dict[str, LoadedModel] = {}
        self._memo: dict[tuple, object] = {}
        self._sha256: dict[str, str] = {}
        self._scores: OrderedDict[tuple, dict] = OrderedDict()
        self.keep_scores = keep_scores

    # -- models and data -------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        """The loaded model (only ``keep_models`` stay in memory; the oldest is dropped)."""
        from esa.models import load_model, weights_sha256

        if name not in self._models:
            while len(self._models) >= self.keep_models:
                dropped = next(iter(self._models))
                del self._models[dropped]
                for key in [k for k in self._scores if k[0] == dropped]:
                    del self._scores[key]
                gc.collect()
            self._models[name] = load_model(name, device=self.device)
            if name not in self._sha256:
                self._sha256[name] = weights_sha256(self._models[name].model)
        return self._models[name]

    def original_sha256(self, name: str) -> str:
        """sha256 of the weights as loaded (before any perturbation of this session)."""
        self.model(name)
        return self._sha256[name]

    def current_sha256(self, name: str) -> str:
        from esa.models import weights_sha256

        return weights_sha256(self.model(name).model)

    def data(self, name: str):
        from esa.data import prepare_data

        return self._cached(
            ("data", name),
            lambda: prepare_data(
                self.model(name).tokenizer,
                self.data_spec,
                self.calib_spec,
                self.tier.max_length,
                self.tier.eval_windows,
            ),
        )

    def names(self, name: str, include_embeddings: bool = False) -> list[str]:
        return self.model(name).param_map.scorable(include_embeddings=include_embeddings)

    # -- measurements ----------------------------------------------------------------------
    def baseline(self, name: str):
        """EvalResult on the evaluation windows."""
        from esa.evaluate import evaluate

        return self._cached(
            ("baseline", name),
            lambda: evaluate(
                self.model(name).model,
                self.data(name).eval_ids,
                self.tier.batch_size,
                self.progress,
                check_leak=True,
                desc=f"{name} baseline",
            ),
        )

    def baseline_resampled(self, name: str, seed: int):
        """EvalResult on ``eval_windows`` windows drawn with ``seed`` from the whole text."""
        from esa.evaluate import evaluate

        def run():
            data = self.data(name)
            pool = torch.cat([data.eval_ids, data.calib_pool])
            gen = torch.Generator().manual_seed(int(seed))
            pick = torch.randperm(pool.shape[0], generator=gen)[: data.eval_ids.shape[0]].sort().values
            return evaluate(self.model(name).model, pool[pick], self.tier.batch_size, self.progress)

        return self._cached(("baseline_resampled", name, seed), run)

    def scores(self, name: str, metric: str, seed: int, include_embeddings: bool = False) -> dict:
        from esa.metrics.cache import cached_scores

        key = (name, metric, seed, include_embeddings)
        if key in self._scores:
            self._scores.move_to_end(key)
            return self._scores[key]
        scores = cached_scores(
            self.model(name),
            self.data(name),
            metric,
            seed,
            calib_windows=self.tier.calib_windows,
            batch_size=self.tier.batch_size,
            hutchinson_samples=self.tier.hutchinson_samples,
            names=self.names(name, include_embeddings),
            progress=self.progress,
        )
        self._scores[key] = scores
        while len(self._scores) > self.keep_scores:  # full score sets are as large as the model
            self._scores.popitem(last=False)
        return scores

    def selection(
        self,
        name: str,
        metric: str,
        seed: int,
        kind: str = "top",
        mode: str = "per_layer",
        k: int | None = None,
        include_embeddings: bool = False,
    ):
        from esa.select import select

        k = k or self.tier.topk
        return self._cached(
            ("selection", name, metric, seed, kind, mode, k, include_embeddings),
            lambda: select(
                self.scores(name, metric, seed, include_embeddings), k, kind, mode, seed=seed, metric=metric
            ),
        )

    def perturbed_eval(self, name: str, cond: Condition) -> dict:
        """PPL / ΔPPL under ``cond`` (restore verified bit-exact on exit) as plain types."""
        from esa.evaluate import evaluate
        from esa.perturb import perturbed

        def run():
            lm, base = self.model(name), self.baseline(name)
            sel = self.selection(
                name, cond.metric, cond.seed, cond.kind, cond.mode, cond.k, cond.include_embeddings
            )
            with perturbed(
                lm.model, sel, cond.perturbation, scale=cond.scale, prob=cond.prob, seed=cond.seed
            ) as info:
                res = evaluate(
                    lm.model,
                    self.data(name).eval_ids,
                    self.tier.batch_size,
                    self.progress,
                    desc=f"{name} {cond.perturbation}/{cond.kind}/seed{cond.seed}",
                )
            return {
                "ppl": res.ppl,
                "delta_ppl": res.ppl - base.ppl,
                "accuracy": res.accuracy,
                "n_weights": int(sel.size),
                "n_changed": int(info.n_changed),
                "restored": bool(info.verified),
                "finite": res.finite,
            }

        return self._cached(("perturbed", name, cond), run)

    def zeroshot(self, name: str, tasks: dict, cond: Condition | None = None) -> dict:
        """Multiple-choice accuracy per task (``tasks``: task name -> examples), at baseline or
        under ``cond`` (restored bit-exactly afterwards)."""
        from esa.analyses.zeroshot import evaluate_task
        from esa.perturb import perturbed

        def run():
            lm = self.model(name)
            if cond is None:
                return {t: evaluate_task(lm, ex, progress=False) for t, ex in tasks.items()}
            sel = self.selection(
                name, cond.metric, cond.seed, cond.kind, cond.mode, cond.k, cond.include_embeddings
            )
            with perturbed(
                lm.model, sel, cond.perturbation, scale=cond.scale, prob=cond.prob, seed=cond.seed
            ):
                return {t: evaluate_task(lm, ex, progress=False) for t, ex in tasks.items()}

        return self._cached(("zeroshot", name, tuple(sorted(tasks)), cond), run)

    def data_manifest(self, name: str) -> dict:
        return self.data(name).manifest()

    def _cached(self, key: tuple, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
