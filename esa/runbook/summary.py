"""Per (metric, perturbation, condition) summary of a run's rows: mean ΔPPL over seeds with its
window-bootstrap CI, and for the super set its comparison with random_k."""

from __future__ import annotations

import numpy as np

from esa import stats


def summarize(rows: list[dict], base_nll: list[float] | None = None) -> list[dict]:
    """Per (metric, perturbation, condition): mean ΔPPL over seeds with its 95% CI from a paired
    bootstrap over evaluation windows (``esa.stats.window_bootstrap``); for the super set, how it
    compares with random_k (``esa.stats.dominance``: the ratio where random_k's ΔPPL > 0, else the
    difference, never a ratio of non-positive numbers) and a one-sided Wilcoxon test on per-window
    ΔNLL (``esa.stats.paired_window_test``). Without per-window NLL the CI is over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["metric"], row["perturbation"], row["condition"]), []).append(row)
    boots: dict[tuple, stats.WindowBootstrap] = {}
    for metric, method in dict.fromkeys((m, p) for m, p, _ in groups):
        conds = {
            c: np.array([r["window_nll"] for r in sorted(items, key=lambda r: r["seed"])])
            for (m, p, c), items in groups.items()
            if (m, p) == (metric, method) and all(r.get("window_nll") for r in items)
        }
        if base_nll and conds:
            boots[(metric, method)] = stats.window_bootstrap(np.asarray(base_nll), conds)
    out = []
    for (metric, method, condition), items in groups.items():
        deltas = [r["delta_ppl"] for r in sorted(items, key=lambda r: r["seed"])]
        boot = boots.get((metric, method))
        entry = {
            "metric": metric,
            "perturbation": method,
            "condition": condition,
            "n_seeds": len(deltas),
            "mean_delta_ppl": sum(deltas) / len(deltas),
            "ci95": list(boot.ci(condition)) if boot else list(stats.bootstrap_ci(deltas)),
            "ci_over": "windows" if boot else "seeds",
            "delta_ppl": deltas,
        }
        if condition == "super" and boot and "random_k" in boot.point:
            entry["vs_random"] = stats.dominance(boot, "super", "random_k", 1.0)
            sup = [r["window_nll"] for r in sorted(items, key=lambda r: r["seed"])]
            rand = [
                r["window_nll"] for r in sorted(groups[(metric, method, "random_k")], key=lambda r: r["seed"])
            ]
            entry["test_vs_random"] = stats.paired_window_test(np.array(sup), np.array(rand))
        out.append(entry)
    return out
