"""A memoizing session object for claim suites: each model is loaded once, and its data,
baseline, scores, selections and perturbation results are computed once and reused.

A perturbed evaluation keeps its per-window mean NLL (``window_nll``, W floats) next to the
baseline's, so claims decide on statistics over evaluation windows (``esa.stats.window_bootstrap``,
``paired_window_test``); the memo holds these arrays, never perturbed weights. Controls (random and
bottom sets) are drawn only among the entries the perturbation changes (``esa.perturb.changeable``).

The pytest plugin exposes one per session (fixture ``esa_workbench``; not the speed benchmark
``esa.bench``); tests are grouped by model on xdist workers, so a worker loads each of its models
once.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from esa.claims.shared import SharedResults
from esa.claims.tiers import Tier
from esa.eligibility import Eligibility
from esa.perturb import PERTURBATIONS, resolve_prob, resolve_scale
from esa.util.runtime import free_memory

if TYPE_CHECKING:
    from esa.models import LoadedModel

log = logging.getLogger("esa")
DRAW_STRIDE = 10_000  # selection seed of random draw j > 0 of seed s: s + DRAW_STRIDE * j
KEEP_SCORE_BYTES = 2 << 30  # whole score sets kept in memory (one at least): three of a 135M model


def _set_bytes(lm: LoadedModel, names: list[str]) -> int:
    """Bytes of one fp32 score set over ``names``."""
    return 4 * sum(math.prod(lm.param_map[n].shape) for n in names)


def draw_seed(seed: int, draw: int) -> int:
    """Seed of draw ``draw`` of calibration seed ``seed`` (draw 0: the seed itself)."""
    return int(seed) + DRAW_STRIDE * int(draw)


@dataclass(frozen=True)
class Condition:
    """One perturbed evaluation: which set, which perturbation, which seed.

    ``scale=None`` and ``prob=None`` take the perturbation's registered defaults
    (``esa.perturb.resolve_scale``: gauss_noise σ = 0.02 x |w|; ``resolve_prob``: bit_flip 0.05,
    else 1), so equal conditions compare (and memoize) equal. ``bit`` (bit_flip only): a position name
    of ``esa.perturb.bit_position`` ("sign", "exponent_msb", ...), an int, or None (the default).
    ``draw`` numbers independent random sets of one seed (the null distribution of random sets):
    draw 0 is the seed's usual control, draw j selects with seed ``seed + DRAW_STRIDE * j``."""

    metric: str
    seed: int
    kind: str  # "top" | "random" | "bottom"
    perturbation: str
    mode: str = "per_layer"
    k: int | None = None
    scale: float | None = None
    prob: float | None = None
    include_embeddings: bool = False
    bit: str | int | None = None
    draw: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", resolve_scale(self.perturbation, self.scale))
        object.__setattr__(self, "prob", resolve_prob(self.perturbation, self.prob))

    @property
    def selection_seed(self) -> int:
        """Seed of the selection and of the perturbation's random numbers (see ``draw``)."""
        return draw_seed(self.seed, self.draw)


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
        keep_score_bytes: int = KEEP_SCORE_BYTES,
        bos: str = "auto",
        shared: SharedResults | None = None,
    ):
        self.tier, self.device, self.data_spec, self.calib_spec = tier, device, data, calib_data
        self.bos = bos  # esa.data.bos_policy mode of every window (--esa-bos)
        self.progress, self.keep_models = progress, keep_models
        self._models: dict[str, LoadedModel] = {}
        self._memo: dict[tuple, object] = {}
        self._sha256: dict[str, str] = {}
        self._scores: OrderedDict[tuple, dict] = OrderedDict()
        self.keep_scores, self.keep_score_bytes = keep_scores, keep_score_bytes
        self.shared = shared or SharedResults(None)  # results other xdist workers computed

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
                free_memory()
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
                bos=self.bos,
            ),
        )

    def names(self, name: str, include_embeddings: bool = False) -> list[str]:
        return self.model(name).param_map.scorable(include_embeddings=include_embeddings)

    # -- measurements ----------------------------------------------------------------------
    def baseline(self, name: str):
        """EvalResult on the evaluation windows."""
        from esa.evaluate import EvalResult, evaluate

        def run():
            model, windows = self.model(name).model, self.data(name).eval_ids
            res = evaluate(model, windows, self.tier.batch_size, self.progress, True, f"{name} baseline")
            return res.to_dict(with_windows=True)

        return self._cached(("baseline", name), lambda: EvalResult(**self._shared(("baseline", name), run)))

    def scores(self, name: str, metric: str, seed: int, include_embeddings: bool = False) -> dict:
        from esa.metrics.cache import cached_scores

        key = (name, metric, seed, include_embeddings)
        if key in self._scores:
            self._scores.move_to_end(key)
            return self._scores[key]
        self._evict_scores(room_for=_set_bytes(self.model(name), self.names(name, include_embeddings)))
        with self.shared.lock(("scores", *key)):  # another worker's computation lands in the score cache
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
                full=True,  # claims read whole distributions (ranks, masses, pruning)
            )
        self._scores[key] = scores
        self._evict_scores(room_for=0)
        return scores

    def _evict_scores(self, room_for: int) -> None:
        """Drop the least recently used score sets (whole sets are as large as the model) until at
        most ``keep_scores`` sets of at most ``keep_score_bytes`` in all remain with ``room_for``
        more bytes (one set always stays; before a computation, none need to)."""
        sizes = {
            k: sum(int(t.numel()) * t.element_size() for t in v.values()) for k, v in self._scores.items()
        }
        while self._scores and (
            len(self._scores) + (room_for > 0) > self.keep_scores
            or sum(sizes.values()) + room_for > self.keep_score_bytes
        ):
            if room_for == 0 and len(self._scores) == 1:
                break
            sizes.pop(self._scores.popitem(last=False)[0])
        free_memory()  # and the freed sets' heap back to the OS (their RSS stays otherwise)

    def selection(
        self,
        name: str,
        metric: str,
        seed: int,
        kind: str = "top",
        mode: str = "per_layer",
        k: int | None = None,
        include_embeddings: bool = False,
        perturbation: str | None = None,
        scale: float | None = None,
        draw: int = 0,
    ):
        """The ``kind`` set of ``metric``'s scores (calibration seed ``seed``). With a
        ``perturbation``, random and bottom sets are drawn only among the entries it changes
        (`eligible`); top sets are the metric's, unrestricted. ``draw`` as in `Condition`."""
        from esa.select import select

        k = k or self.tier.topk
        allowed = None  # controls draw among the entries the perturbation changes
        if perturbation is not None and kind in ("random", "bottom"):
            allowed = self.eligible(name, perturbation, scale, include_embeddings)
        restrict = allowed.digest if allowed is not None else None  # the same entries, the same key
        key = ("selection", name, metric, seed, kind, mode, k, include_embeddings, restrict, draw)

        def run():
            scores = self.scores(name, metric, seed, include_embeddings)
            sel_seed = draw_seed(seed, draw)
            return select(scores, k, kind, mode, seed=sel_seed, metric=metric, eligible=allowed)

        return self._cached(key, run)

    def eligible(
        self, name: str, perturbation: str, scale: float | None = None, include_embeddings: bool = False
    ):
        """Tensor name -> bool mask of the entries ``perturbation`` changes (``esa.perturb.changeable``),
        frozen once per model, perturbation and σ (`esa.eligibility.Eligibility`: the excluded
        positions only; the weights are restored bit-exactly after every perturbation)."""
        from esa.perturb import changeable

        def run():
            names = self.names(name, include_embeddings)
            lm = self.model(name)
            return Eligibility.of(changeable(lm.model, perturbation, names=names, scale=scale))

        return self._cached(
            ("eligible", name, perturbation, resolve_scale(perturbation, scale), include_embeddings), run
        )

    def _cond_selection(self, name: str, cond: Condition):
        return self.selection(
            name,
            cond.metric,
            cond.seed,
            cond.kind,
            cond.mode,
            cond.k,
            cond.include_embeddings,
            perturbation=cond.perturbation,
            scale=cond.scale,
            draw=cond.draw,
        )

    def _bit(self, name: str, cond: Condition) -> int | None:
        """The bit position of a bit-using perturbation as an int (names resolved for the
        model's dtype; None keeps the registered default), so equal positions memoize equal."""
        from esa.perturb import bit_position

        if not PERTURBATIONS[cond.perturbation].uses_bit:
            return None
        model: Any = self.model(name).model
        return bit_position(cond.bit, model.get_input_embeddings().weight.dtype)

    def perturbed_eval(self, name: str, cond: Condition) -> dict:
        """PPL / ΔPPL under ``cond`` (restore verified bit-exact on exit) as plain types, with the
        per-window mean NLL (``window_nll``, one float per evaluation window)."""
        from esa.evaluate import evaluate
        from esa.perturb import perturbed

        bit = self._bit(name, cond)

        def run():
            lm, base = self.model(name), self.baseline(name)
            sel = self._cond_selection(name, cond)
            with perturbed(
                lm.model,
                sel,
                cond.perturbation,
                scale=cond.scale,
                prob=cond.prob,
                bit=bit,
                seed=cond.selection_seed,
            ) as info:
                res = evaluate(
                    lm.model,
                    self.data(name).eval_ids,
                    self.tier.batch_size,
                    self.progress,
                    desc=f"{name} {cond.perturbation}/{cond.kind}/seed{cond.seed}/draw{cond.draw}",
                )
            return {
                "ppl": res.ppl,
                "delta_ppl": res.ppl - base.ppl,
                "accuracy": res.accuracy,
                "n_weights": int(sel.size),
                "n_changed": int(info.n_changed),
                "restored": bool(info.verified),
                "finite": res.finite,
                "window_nll": list(res.window_nll),
            }

        key = ("perturbed", name, replace(cond, bit=bit))
        return self._cached(key, lambda: self._shared(key, run))

    # -- per-window arrays for the window statistics (esa.stats) ------------------------------
    def baseline_nll(self, name: str) -> np.ndarray:
        """Per-window mean NLL of the unperturbed model, [W]."""
        return np.asarray(self.baseline(name).window_nll, dtype=float)

    def condition_nll(self, name: str, metric: str, kind: str, perturbation: str, **options) -> np.ndarray:
        """Per-window mean NLL under the condition for every seed of the tier, [S, W] (``options``:
        further `Condition` fields: scale, prob, bit, k, mode, draw)."""
        rows = [
            self.perturbed_eval(name, Condition(metric, s, kind, perturbation, **options))["window_nll"]
            for s in self.tier.seeds
        ]
        return np.asarray(rows, dtype=float)

    def random_null(self, name: str, metric: str, perturbation: str, n_sets: int, **options) -> np.ndarray:
        """ΔPPL of ``n_sets`` independent random sets, [n_sets]: the null distribution a top set is
        compared with. A random set depends on its selection seed only (never on the calibration
        scores), so one null serves every seed: set i is draw i // S of seed ``seeds[i % S]`` (the
        first S are the seeds' usual random controls). Each set costs one evaluation (memoized)."""
        seeds, n = self.tier.seeds, int(n_sets)
        draws = [
            Condition(metric, seeds[i % len(seeds)], "random", perturbation, draw=i // len(seeds), **options)
            for i in range(n)
        ]
        return np.asarray([self.perturbed_eval(name, c)["delta_ppl"] for c in draws], dtype=float)

    def zeroshot(self, name: str, tasks: dict, cond: Condition | None = None) -> dict:
        """Multiple-choice accuracy per task (``tasks``: task name -> examples), at baseline or
        under ``cond`` (restored bit-exactly afterwards)."""
        from esa.analyses.zeroshot import evaluate_task
        from esa.perturb import perturbed

        def run():
            lm = self.model(name)
            if cond is None:
                return {t: evaluate_task(lm, ex, progress=False) for t, ex in tasks.items()}
            sel = self._cond_selection(name, cond)
            bit, seed = self._bit(name, cond), cond.selection_seed
            with perturbed(
                lm.model, sel, cond.perturbation, scale=cond.scale, prob=cond.prob, bit=bit, seed=seed
            ):
                return {t: evaluate_task(lm, ex, progress=False) for t, ex in tasks.items()}

        key = ("zeroshot", name, tuple(sorted(tasks)), cond)
        return self._cached(key, lambda: self._shared(key, run))

    def data_manifest(self, name: str) -> dict:
        return self.data(name).manifest()

    def _shared(self, key: tuple, compute):
        """``compute()`` once per session, whichever xdist worker asks first; keyed also by the
        tier, so one directory never mixes tiers."""
        return self.shared.get((self.tier.name, *key), compute)

    def _cached(self, key: tuple, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
