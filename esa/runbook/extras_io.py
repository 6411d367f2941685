"""Artifacts of the optional analyses (``esa.runbook.extras``): ``analyses.json``, one CSV per
table and, with ``--save-plots``, their figures under ``plots/``. A figure that fails warns and
is skipped; it never fails the run.

Files: ``architecture_<metric>.csv`` (layer, component, expert, group, count, share, entries,
param_share, enrichment, score_sum, score_share...), ``architecture_heads_<metric>.csv``,
``architecture_experts_<metric>.csv`` (MoE), ``clusters_<metric>.csv`` (one row per top-k weight
with its features and ``cluster``), ``score_stats.csv`` (``--export-stats``), ``downstream.csv``
(per metric, perturbation, condition and task: mean accuracy over seeds and its change from the
baseline), and ``analyses.json`` with every plain-valued result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from esa import plots
from esa.analyses import components
from esa.runbook import extras as analyses
from esa.runbook.extras import Extras, frames
from esa.util.serialize import dumps

log = logging.getLogger("esa")


def downstream_table(extras: Extras, rows: list[dict]) -> pd.DataFrame:
    """Per (metric, perturbation, condition, task): n_seeds, mean accuracy, baseline, delta."""
    base = extras.downstream.get("baseline", {})
    records = []
    for task, ref in base.items():
        column = f"acc_{task}"
        df = pd.DataFrame([r for r in rows if column in r])
        if df.empty:
            continue
        for (metric, method, cond), group in df.groupby(["metric", "perturbation", "condition"], sort=False):
            acc = float(group[column].mean())
            records.append(
                {
                    "metric": metric,
                    "perturbation": method,
                    "condition": cond,
                    "task": task,
                    "n_seeds": len(group),
                    "n_examples": int(ref["n"]),
                    "acc": acc,
                    "acc_baseline": float(ref["acc"]),
                    "delta_acc": acc - float(ref["acc"]),
                }
            )
    return pd.DataFrame(records)


def write(folder: Path, extras: Extras, rows: list[dict], save_plots: bool, also=()) -> None:
    """Every artifact of ``extras`` into the run's staging ``folder`` (figures: PNG, plus a copy in
    each format of ``also``, e.g. ``plots.VECTOR_FORMATS``)."""
    tables = frames(extras)
    down = downstream_table(extras, rows)
    if not down.empty:
        tables["downstream.csv"] = down
    for name, frame in tables.items():
        frame.to_csv(folder / name, index=False)
    data = extras.to_json()
    if not down.empty:
        data["downstream"] = down.to_dict(orient="records")
    (folder / "analyses.json").write_text(dumps(data, indent=2) + "\n")
    if save_plots:
        (folder / "plots").mkdir(exist_ok=True)
        for name, make in _figures(extras):
            try:
                plots.save_figure(make(), folder / "plots" / name, also=also)
            except Exception as exc:  # a figure is a side job: warn, keep the run
                log.warning("esa: plot %s skipped (%s: %s)", name, type(exc).__name__, exc)


def _figures(extras: Extras):
    """(file name, figure factory) of every cheap figure."""
    shown = {"share": "top-k", "score_share": "score mass", "param_share": "parameter"}
    if extras.config.mode == "per_layer":  # k per tensor: the top-k share is uniform by construction
        del shown["share"]
    for metric, a in extras.architecture.items():
        for value, what in shown.items():
            title = f"{metric}: {what} share per layer x component"
            yield f"architecture_{value}_{metric}.png", _bind(components.heatmap, a["table"], value, title)
    for metric, v in extras.clusters.items():
        title = f"{metric} top-k clusters"
        yield (
            f"clusters_{metric}.png",
            _bind(analyses.clusters.plot_clusters, v["records"], v["result"], title),
        )
    for metric, result in extras.progressive.items():
        yield f"progressive_{metric}.png", _bind(analyses.progressive_mod.plot_progressive, result)
    temporal = extras.temporal or {}
    for key, result in temporal.items():
        matrix = result.get("stability", result)  # checkpoints nest theirs under "stability"
        yield f"stability_{key}.png", _bind(plot_matrix, matrix["names"], matrix["jaccard"], key)


def _bind(fn, *args):
    return lambda: fn(*args)


def plot_matrix(names: list[str], matrix, title: str):
    """Pairwise top-k Jaccard as a heatmap with its values."""
    data = np.asarray(matrix, dtype=float)
    fig, ax = plots.figure(max(4.0, 1.5 + 0.6 * len(names)), max(3.5, 1.2 + 0.5 * len(names)))
    im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (r, c), v in np.ndenumerate(data):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_title(f"top-k Jaccard ({title})", fontsize=10)
    fig.colorbar(im, ax=ax, label="Jaccard")
    return fig


def summary_lines(extras: Extras) -> list[str]:
    """One line per analysis for the end-of-run summary (the files hold the details)."""
    lines = []
    for metric, a in extras.architecture.items():
        g = a["groups"]
        lines.append(
            f"architecture {metric}: top-k {_pct(g['topk'])}; parameters {_pct(g['params'])}"
            + (f"; score mass {_pct(g['score'])}" if g.get("score") else "")
        )
    for metric, v in extras.clusters.items():
        sizes = [c.get("size") for c in v["result"].get("clusters", [])]
        lines.append(f"weight analysis {metric}: {extras.config.clustering_method}, cluster sizes {sizes}")
    for c in extras.correlations:
        lines.append(
            f"metric correlation {c['metric_a']} vs {c['metric_b']} on the top-k of {c['on_topk_of']}: "
            f"Spearman rho {_value(c['rho'])} (p {_value(c['pvalue'])}, n {c['n']})"
        )
    for metric, p in extras.progressive.items():
        cmp = p.get("critical_vs_random") or {}
        needed = cmp.get("text") or f"weights needed {p['weights_needed']}"
        lines.append(f"progressive {metric} ({p['method']}, PPL x{p['factor']:g}): {needed}")
    for key, result in (extras.temporal or {}).items():
        m = result.get("stability", result)
        line = (
            f"temporal stability over {len(m['names'])} {key}: mean top-k Jaccard {_value(m['mean_jaccard'])}"
        )
        sw = result.get("super_weight")
        if sw is not None:
            line += (
                f"; super weight first detected at {sw['first_appearance']} (stable from {sw['stable_from']})"
            )
        lines.append(line)
    for task, r in extras.downstream.get("baseline", {}).items():
        lines.append(f"downstream {task}: baseline acc {r['acc']:.3f} on {r['n']} examples (downstream.csv)")
    return lines


def _pct(shares: dict) -> str:
    return ", ".join(f"{g} {v:.0%}" for g, v in shares.items() if v)


def _value(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)
