"""The runbook's curvature settings: which tensors each metric scores, checked before the baseline,
and what the manifest records about the curvature metrics (``curvature``).

``hessian_diag`` is exact (one Hessian-vector product per scored entry) and refuses more than
``HESSIAN_MAX_ENTRIES`` entries, so on any real model it needs ``--hessian-tensors REGEX``: the
parameters whose names match (``re.search``, every parameter of the model, norms and biases
included even without ``--include-norms``) are the tensors it scores, and its super set and
controls are drawn among them. Every other metric scores the run's scorable tensors. The
curvature metrics (``CURVATURE``) run on ``--curvature-calib-samples`` windows per seed when set:
the seed's draw of n windows (``DataBundle.calibration`` takes the first n of one seeded
permutation), so a subset of the seed's first-order calibration windows.
"""

from __future__ import annotations

import re

from esa.errors import ConfigError
from esa.metrics.registry import HESSIAN_MAX_ENTRIES
from esa.runbook.config import CURVATURE, ExperimentConfig


def metric_names(config: ExperimentConfig, lm, names: list[str]) -> dict[str, list[str]]:
    """``{metric: tensors it scores}``: ``names`` (the run's scorable tensors) for every metric
    but ``hessian_diag`` under ``--hessian-tensors``, which gets the matching parameters."""
    out = {m: list(names) for m in config.metrics}
    if "hessian_diag" in out and config.hessian_tensors is not None:
        pattern = re.compile(config.hessian_tensors)
        every = [n for n, _ in lm.model.named_parameters()]
        matched = [n for n in every if pattern.search(n) and n in lm.param_map.infos]
        if not matched:
            raise ConfigError(
                f"--hessian-tensors {config.hessian_tensors!r} matches no parameter of {lm.name}: "
                f"names look like {every[-1]!r}"
            )
        out["hessian_diag"] = matched
    if "hessian_diag" in out:
        entries = sum(lm.param_map[n].numel for n in out["hessian_diag"])
        if entries > HESSIAN_MAX_ENTRIES:
            raise ConfigError(
                f"hessian_diag is exact (one Hessian-vector product per entry) and would score {entries} "
                f"entries > {HESSIAN_MAX_ENTRIES}: name a few small tensors with --hessian-tensors "
                "(e.g. 'model\\.norm\\.weight$', the final norm) or use hutchinson_diag"
            )
    return out


def protocol(config: ExperimentConfig, lm, data, names_by: dict[str, list[str]]) -> dict | None:
    """The manifest's ``curvature`` entry (None without a curvature metric): windows per seed and
    tokens, probes, the exact diagonal's tensors and entries, the seeds' window overlap."""
    metrics = [m for m in config.metrics if m in CURVATURE]
    if not metrics:
        return None
    n = config.windows_for(metrics[0])
    out: dict = {
        "metrics": metrics,
        "calib_windows": n,
        "calib_tokens": n * int(data.max_length),
        "first_order_calib_windows": config.calib_windows(),
        "windows_subset_of_first_order": True,
        "calibration_overlap": data.calibration_overlap(n, config.seeds),
    }
    if "hutchinson_diag" in metrics:
        out["hutchinson_samples"] = int(config.hutchinson_samples)
    if "hessian_diag" in metrics:
        tensors = names_by["hessian_diag"]
        out["hessian_tensors"] = {
            "pattern": config.hessian_tensors,
            "names": list(tensors),
            "entries": int(sum(lm.param_map[t].numel for t in tensors)),
            "max_entries": HESSIAN_MAX_ENTRIES,
        }
    return out
