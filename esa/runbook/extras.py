"""The old runner's optional analyses inside ``esa run`` (``--weight-analysis``,
``--architecture-analysis``, ``--temporal-stability``, ``--advanced-perturbations progressive``,
``--downstream-tasks``, ``--export-stats``), collected in one :class:`Extras` per run.

``run_experiment`` calls, in order: :meth:`Extras.prepare` (before the model loads: tasks read,
missing analyses refused), :meth:`Extras.baseline` (zero-shot accuracy of the unperturbed model),
:meth:`Extras.on_scores` once per (metric, seed) while the scores exist, :meth:`Extras.on_perturbed`
inside every perturbation (zero-shot accuracy of the perturbed model), :meth:`Extras.finish` after
the last seed. What each computes (first seed s0 of each metric unless said):

- architecture: ``esa.analyses.components.component_table`` of the top-k with scores; per
  (layer, component, expert) cell ``share`` = top-k entries in the cell / k_total, ``param_share`` =
  entries of the cell / entries scored, ``enrichment`` = share / param_share (1 = as many as its size
  gives; per_layer mode fixes k per tensor, so compare within a tensor), ``score_share`` = score
  mass of the cell / total; group shares (attention, mlp, ...) of the three; per head and per expert.
- weights: ``esa.analyses.clusters.cluster_topk`` (scikit-learn KMeans / DBSCAN) on the top-k's
  features; with several metrics the Spearman correlation of their scores on each top-k
  (``metric_correlation``; keeps each metric's s0 scores on the CPU until the end).
- stats: per (metric, seed, tensor) ``esa.metrics.score_summary`` (entries, max, mean, median,
  p99, top-1% mean, concentration).
- progressive: ``esa.analyses.progressive.progressive`` (critical vs random sets grown until a
  damage target; how many weights each needs).
- temporal: ``esa.analyses.temporal.stability_matrix`` over every (metric, seed) top-k of the run
  and, with ``checkpoints`` (model specs or ``name@revision``, in training order),
  ``temporal_stability``: the first metric's s0 top-k of each checkpoint (the run's model last),
  Jaccard between consecutive checkpoints and when the detected super weight first appears.
- downstream: ``esa.analyses.zeroshot.evaluate_task`` on ``task_samples`` examples per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from esa.analyses import components
from esa.analyses.tasks import load_task
from esa.analyses.zeroshot import evaluate_task
from esa.errors import ConfigError, DataError
from esa.metrics import score_summary
from esa.models import LoadedModel
from esa.runbook.config import ExperimentConfig
from esa.select import Selection

try:  # the analyses behind the old runner's flags (issue 13); a missing one refuses its flag
    from esa.analyses import clusters
except ImportError:  # pragma: no cover - depends on the checkout
    clusters = None  # type: ignore[assignment]
try:
    from esa.analyses import temporal
except ImportError:  # pragma: no cover
    temporal = None  # type: ignore[assignment]
try:
    from esa.analyses import progressive as progressive_mod
except ImportError:  # pragma: no cover
    progressive_mod = None  # type: ignore[assignment]

_NEEDS = {
    "--weight-analysis": ("weight_analysis", lambda: clusters),
    "--temporal-stability": ("temporal_stability", lambda: temporal),
    "--advanced-perturbations progressive": ("progressive", lambda: progressive_mod),
}


def _check_implemented(config: ExperimentConfig) -> None:
    for flag, (attr, module) in _NEEDS.items():
        wanted = (
            "progressive" in config.advanced_perturbations if attr == "progressive" else getattr(config, attr)
        )
        if wanted and module() is None:
            raise ConfigError(f"{flag} is not implemented in this checkout: drop the flag")


def task_label(name: str) -> str:
    """A task's name in columns and files: the hub name, or a JSONL file's stem."""
    return Path(name).stem if name.endswith(".jsonl") else name


@dataclass
class Extras:
    """What the optional analyses measured (plain values and frames; written by ``extras_io``)."""

    config: ExperimentConfig
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # label -> examples
    architecture: dict = field(default_factory=dict)  # metric -> tables and group shares
    clusters: dict = field(default_factory=dict)  # metric -> {"result": dict, "records": frame}
    correlations: list = field(default_factory=list)
    stats: list = field(default_factory=list)  # one dict per (metric, seed, tensor)
    progressive: dict = field(default_factory=dict)  # metric -> progressive(...) result
    temporal: dict | None = None
    downstream: dict = field(default_factory=dict)  # "baseline" -> task -> result
    kept: dict = field(default_factory=dict)  # metric -> CPU scores of s0 (correlations)

    @classmethod
    def prepare(cls, config: ExperimentConfig) -> Extras:
        """Refuse flags whose analysis is missing; read the tasks (before any model loads)."""
        _check_implemented(config)
        extras = cls(config)
        for name in config.tasks if config.downstream_tasks else []:
            try:
                extras.tasks[task_label(name)] = load_task(name, limit=config.task_samples)
            except DataError as exc:
                raise DataError(f"--downstream-tasks: {exc} (esa run --tasks FILE.jsonl,...)") from None
        return extras

    @property
    def active(self) -> bool:
        c = self.config
        return bool(
            c.weight_analysis
            or c.architecture_analysis
            or c.temporal_stability
            or c.downstream_tasks
            or c.export_stats
            or "progressive" in c.advanced_perturbations
        )

    @property
    def needs_scores(self) -> bool:
        """Whether an analysis reads the whole score tensors (not only the top-k candidates)."""
        c = self.config
        return bool(
            c.weight_analysis
            or c.architecture_analysis
            or c.export_stats
            or "progressive" in c.advanced_perturbations
        )

    def _tasks_now(self, lm: LoadedModel) -> dict:
        return {
            name: evaluate_task(lm, examples, batch_size=self.config.batch_size, progress=False)
            for name, examples in self.tasks.items()
        }

    def baseline(self, lm: LoadedModel) -> None:
        if self.tasks:
            self.downstream["baseline"] = self._tasks_now(lm)

    def on_perturbed(self, lm: LoadedModel) -> dict:
        """``acc_<task>`` columns for the row of the (perturbed) model as it is now."""
        return {f"acc_{t}": r["acc"] for t, r in self._tasks_now(lm).items()}

    def on_scores(self, lm: LoadedModel, data, scores: dict, selection: Selection) -> None:
        """Per (metric, seed): the statistics; at the first seed the per-metric analyses."""
        c, metric, seed = self.config, selection.metric, selection.seed
        if c.export_stats:
            self.stats += _tensor_stats(lm, scores, metric, seed)
        if seed != c.seeds[0]:
            return
        if c.architecture_analysis:
            self.architecture[metric] = architecture(lm, selection, scores)
        if c.weight_analysis:
            records = clusters.records_from_selection(lm, selection, scores)
            result = clusters.cluster_topk(records, c.clustering_method, c.n_clusters, seed)
            self.clusters[metric] = {"result": result, "records": records.assign(cluster=result["labels"])}
            if len(c.metrics) > 1:
                self.kept[metric] = {n: v.detach().to("cpu") for n, v in scores.items()}
        if "progressive" in c.advanced_perturbations:
            method = c.perturbations[0] if c.perturbations else "zero"
            self.progressive[metric] = progressive_mod.progressive(
                lm, data, scores, method, scale=c.scale_for(method), prob=c.prob_for(method),
                bit=c.perturb_bit, seed=seed, batch_size=c.eval_batch_size or c.batch_size,
                metric=metric, progress=c.progress,
            )  # fmt: skip

    def finish(self, lm: LoadedModel, data, selections: dict) -> None:
        """Cross-metric correlations and the temporal stability matrices."""
        c = self.config
        for i, a in enumerate(c.metrics if self.kept else []):
            for b in c.metrics[i + 1 :]:
                for on in (a, b):
                    sel = selections[(on, c.seeds[0])]
                    value = clusters.metric_correlation(self.kept[a], self.kept[b], sel)
                    self.correlations.append({"metric_a": a, "metric_b": b, "on_topk_of": on, **value})
        self.kept.clear()
        if c.temporal_stability:
            named = {f"{m}/seed{s}": sel for (m, s), sel in selections.items()}
            self.temporal = {"conditions": temporal.stability_matrix(named)}
            if c.checkpoints:
                self.temporal["checkpoints"] = self._checkpoints(lm, data)

    def _checkpoints(self, lm: LoadedModel, data) -> dict:
        """``esa.analyses.temporal.temporal_stability`` over the checkpoints in order, the run's
        model last (reused, not reloaded), on the first seed's calibration windows."""
        c = self.config
        specs = list(dict.fromkeys([*c.checkpoints, c.model]))

        def loader(spec, **kw):
            return lm if spec == c.model else temporal.load_checkpoint(spec, **kw)

        return temporal.temporal_stability(
            specs, data.calibration(c.calib_samples or c.max_samples, c.seeds[0]), c.metrics[0], c.topk,
            c.mode, c.seeds[0], dtype=c.dtype, device=c.device, batch_size=c.batch_size, loader=loader,
            progress=c.progress,
        )  # fmt: skip

    def to_json(self) -> dict:
        """The JSON-able part (frames go to CSV files)."""
        out: dict = {}
        if self.architecture:
            out["architecture"] = {m: a["groups"] for m, a in self.architecture.items()}
        if self.clusters:
            out["weight_analysis"] = {  # the labels are in clusters_<metric>.csv
                m: {k: x for k, x in v["result"].items() if k != "labels"} for m, v in self.clusters.items()
            }
            out["metric_correlations"] = self.correlations
        if self.progressive:
            out["progressive"] = self.progressive
        if self.temporal is not None:
            out["temporal_stability"] = self.temporal
        if self.downstream:
            out["downstream_baseline"] = self.downstream["baseline"]
        return out


def architecture(lm: LoadedModel, selection: Selection, scores: dict) -> dict:
    """Top-k shares vs parameter shares per (layer, component, expert), per group, head, expert."""
    table = components.component_table(selection, lm.param_map, scores)
    entries = float(table["entries"].sum())
    table["param_share"] = table["entries"] / entries if entries else 0.0
    table["enrichment"] = table["share"] / table["param_share"].where(table["param_share"] > 0)
    groups = components.group_ratios(table)
    groups["params"] = components.group_ratios(table.assign(count=table["entries"]))["topk"]
    heads = components.per_head(selection, lm.param_map, lm.model.config)
    experts = components.per_expert(selection, lm.param_map, scores) if (table["expert"] >= 0).any() else None
    return {"table": table, "groups": groups, "heads": heads, "experts": experts}


def _tensor_stats(lm: LoadedModel, scores: dict, metric: str, seed: int) -> list[dict]:
    rows = []
    for name, score in scores.items():
        info = lm.param_map[name]
        summary = score_summary({name: score}, seed=seed)
        rows.append(
            {
                "metric": metric,
                "seed": int(seed),
                "tensor": name,
                "layer": info.layer,
                "component": info.component,
                **{k: v for k, v in summary.items() if k != "tensors"},
            }
        )
    return rows


def frames(extras: Extras) -> dict[str, pd.DataFrame]:
    """file name -> frame of every CSV the analyses produce."""
    out: dict[str, pd.DataFrame] = {}
    for metric, a in extras.architecture.items():
        out[f"architecture_{metric}.csv"] = a["table"]
        out[f"architecture_heads_{metric}.csv"] = a["heads"]
        if a["experts"] is not None:
            out[f"architecture_experts_{metric}.csv"] = a["experts"]
    for metric, v in extras.clusters.items():
        out[f"clusters_{metric}.csv"] = v["records"]
    if extras.stats:
        out["score_stats.csv"] = pd.DataFrame(extras.stats)
    return out
