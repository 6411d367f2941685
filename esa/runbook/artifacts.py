"""Run artifacts: a staging directory renamed into place at the end (never a partial out-dir),
the manifest, CSV/JSON results, plots and the one-screen summary."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from esa import plots
from esa.errors import ConfigError
from esa.metrics.cache_store import usage_line
from esa.runbook import extras_io
from esa.util.files import umask
from esa.util.runtime import package_root, run_environment
from esa.util.serialize import jsonable

RESULT_FILES = ("results.json", "results.csv", "experiment_manifest.json", "top_weights.csv")


class Staging:
    """A temp directory beside ``out_dir`` that becomes ``out_dir`` on :meth:`commit`."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.target = Path(out_dir).expanduser().absolute()
        if self.target.exists() and not self.target.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is a file: choose a directory path")
        if self.target.is_dir() and any((self.target / f).exists() for f in RESULT_FILES) and not overwrite:
            raise ConfigError(
                f"--out-dir {out_dir} already holds results: pass --overwrite or choose another --out-dir"
            )
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-"))
        except OSError as exc:
            raise ConfigError(
                f"cannot write to --out-dir {out_dir} ({exc.strerror or exc}): choose a writable directory"
            ) from None

    def commit(self) -> Path:
        """Move the staged files into place (replacing an old out-dir only with overwrite)."""
        os.chmod(self.path, 0o777 & ~umask())  # mkdtemp makes it 0700: readable by others, like mkdir
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def write_all(staging: Staging, result, lm, scores_by: dict) -> None:
    """Write every artifact of ``result`` into the staging directory."""
    out = staging.path
    cfg = result.config
    write_json(out / "config.json", cfg.to_dict())
    write_json(
        out / "experiment_manifest.json",
        {
            "command": sys.argv,
            "environment": run_environment(package_root()),
            "model": result.model,
            "data": result.data,
            "calibration_overlap": result.protocol.get("calibration_overlap"),
            "curvature": result.protocol.get("curvature"),
            "controls_excluded": result.protocol.get("controls_excluded"),
            "perturbation_options": result.protocol.get("perturbation_options"),
            "score_cache": result.protocol.get("score_cache"),
            "seeds": cfg.seeds,
            "metrics": cfg.metrics,
            "perturbations": cfg.methods(),
            "controls": cfg.controls,
            "timings": result.timings,
            "peak_memory_bytes": result.baseline.get("peak_memory_bytes"),
            "memory_bytes": getattr(result, "memory", {}),
        },
    )
    frames = []
    for (metric, seed), selection in result.selections.items():
        df = selection.to_frame(lm.param_map)
        df.insert(0, "seed", seed)
        df.insert(0, "metric", metric)
        frames.append(df)
    top = pd.concat(frames, ignore_index=True)
    top.to_csv(out / "top_weights.csv", index=False)
    pd.DataFrame(result.rows).drop(columns="window_nll", errors="ignore").to_csv(
        out / "results.csv", index=False
    )
    write_json(
        out / "results.json",
        {
            "baseline": result.baseline,
            "rows": result.rows,
            "summary": result.summary,
            "score_summaries": result.score_summaries,
        },
    )
    if result.stability is not None:
        write_json(out / "stability.json", result.stability)
    also = plots.VECTOR_FORMATS if cfg.vector_plots else ()
    if cfg.save_plots:
        _write_plots(out / "plots", result, top, scores_by, also)
    if result.extras is not None and result.extras.active:
        extras_io.write(out, result.extras, result.rows, cfg.save_plots, also)


def _write_plots(folder: Path, result, top: pd.DataFrame, scores_by: dict, also=()) -> None:
    folder.mkdir()
    for metric, scores in scores_by.items():
        plots.save_figure(
            plots.plot_score_distribution(scores, f"{metric} scores ({result.model['name']})"),
            folder / f"score_distribution_{metric}.png",
            also=also,
        )
        first = top[(top["metric"] == metric) & (top["seed"] == result.config.seeds[0])]
        plots.save_figure(
            plots.plot_layer_component_heatmap(
                first, "count", f"top-{result.config.topk} {metric} weights per layer x component"
            ),
            folder / f"heatmap_{metric}.png",
            also=also,
        )
    for method in result.config.methods():
        for metric in result.config.metrics:
            conds = {
                r["condition"]: r["delta_ppl"]
                for r in result.summary
                if r["perturbation"] == method and r["metric"] == metric
            }
            conds = {
                c: [
                    x
                    for x in next(
                        s["delta_ppl"]
                        for s in result.summary
                        if s["perturbation"] == method and s["metric"] == metric and s["condition"] == c
                    )
                ]
                for c in conds
            }
            plots.save_figure(
                plots.plot_delta_ppl_bars(conds, f"ΔPPL under {method} ({metric})"),
                folder / f"delta_ppl_{metric}_{method}.png",
                also=also,
            )


def _data_line(data: dict, overlap: dict | None) -> str:
    """Which texts were used: evaluation, calibration (disjoint or not), seeds' overlap."""
    calib = data["calibration"]
    where = calib["name"] if calib.get("from") == "a separate text" else "windows after the evaluation ones"
    line = (
        f"data: eval {data['eval']['name']}, calibration {where} "
        f"({'disjoint' if data.get('calibration_disjoint') else 'NOT disjoint'} from eval)"
    )
    if overlap and len(overlap["seeds"]) > 1:
        line += f"; seeds' calibration sets: mean Jaccard {overlap['mean_jaccard']:.3f}"
    return line


def format_summary(result) -> str:
    """The one-screen summary printed at the end of ``esa run``."""
    b = result.baseline
    w = max([13, *(len(s["perturbation"]) + 1 for s in result.summary)])  # perturbation column
    lines = [
        f"esa run: {result.model['name']} ({result.model['num_parameters']:,} params, "
        f"{result.model['dtype']}, {result.model['device']})",
        f"baseline: PPL {b['ppl']:.3f}  accuracy {b['accuracy']:.3f}  "
        f"{b['n_windows']} windows x {result.data['max_length']} tokens  {b['tokens_per_s']:.0f} tok/s",
        _data_line(result.data, result.protocol.get("calibration_overlap")),
        f"{'metric':<16}{'perturbation':<{w}}{'condition':<10}{'mean ΔPPL':>12}  {'95% CI':<24}{'vs random':>10}",
        "(vs random: ratio of mean ΔPPL, or the difference super − random where random did no damage)",
    ]
    for s in result.summary:
        ci = f"[{s['ci95'][0]:.4g}, {s['ci95'][1]:.4g}]"
        vs = s.get("vs_random")
        ratio_txt = (
            "" if not vs else (f"{vs['value']:.3g}x" if vs["key"] == "ratio" else f"{vs['value']:+.3g}")
        )
        lines.append(
            f"{s['metric']:<16}{s['perturbation']:<{w}}{s['condition']:<10}"
            f"{s['mean_delta_ppl']:>12.4g}  {ci:<24}{ratio_txt:>10}"
        )
    if result.stability:
        for metric, st in result.stability["metrics"].items():
            if st["mean_jaccard"] is not None:
                lines.append(
                    f"stability {metric}: mean Jaccard {st['mean_jaccard']:.3f} "
                    f"(min {st['min_jaccard']:.3f}) across seeds {result.config.seeds}"
                )
    if result.extras is not None:
        lines += extras_io.summary_lines(result.extras)
    if result.protocol.get("score_cache"):
        lines.append(usage_line(result.protocol["score_cache"]))
    lines.append(
        f"took {result.timings.get('total_s', 0):.1f} s"
        + (f"; artifacts in {result.out_dir}" if result.out_dir else "")
    )
    return "\n".join(lines)
