"""The claims x models matrix that opens the report: does the super-weight hypothesis hold on
these models?

Rows are the headline claims (`HEADLINE`: seed stability, super vs random, dose response,
scaling fit, detector), one row per variant a claim is parametrized over (perturbation, bit,
measure, ...) and per metric when the run scored several; columns are the models, and first
"across models" for a claim over several models or a scaling series. A cell is
one claim: its verdict (coloured), its key value and the anchor of its details. A run with fewer
than two headline claims gets the same matrix over all its claims.
"""

from __future__ import annotations

from collections.abc import Mapping

from esa.claims.report_format import (
    COLORS,
    MARKS,
    TINTS,
    anchor,
    case,
    fmt,
    function_name,
    key_measure,
    names,
)
from esa.claims.report_tables import model_names

HEADLINE = (  # test function -> what the row says
    ("test_topk_stable_across_seeds", "seed stability"),
    ("test_super_beats_random", "super vs random"),
    ("test_dose_response_monotonic", "dose response"),
    ("test_scaling_power_law", "scaling fit"),
    ("test_super_weight_detected_and_critical", "detector"),
)
ACROSS = "across models"


def column_of(claim: Mapping) -> str:
    """The matrix column of a claim: its model, else `ACROSS` (several models, a scaling series)."""
    model = names((claim.get("context") or {}).get("model"))
    return model[0] if len(model) == 1 else ACROSS


def cell(claim: Mapping) -> dict:
    """One matrix cell: verdict, its colours, key measurement (name and formatted value), anchor,
    and the previous verdict when a comparison changed it."""
    verdict = claim.get("verdict", "error")
    kname, kvalue = key_measure(claim)
    kname = kname if kname is not None and _short(kvalue) else None
    compare = claim.get("compare") or {}
    return {
        "verdict": verdict,
        "color": COLORS.get(verdict, COLORS["error"]),
        "tint": TINTS.get(verdict, TINTS["error"]),
        "mark": MARKS.get(verdict, MARKS["error"]),
        "key": kname,
        "value": fmt(kvalue) if kname else "",
        "raw": kvalue,
        "anchor": anchor(claim),
        "was": compare.get("previous") if compare.get("status") == "changed verdict" else None,
    }


def _short(value) -> bool:
    """A value that fits a matrix cell: a number, a bool or a string of at most 60 characters."""
    return isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 60)


def _label(function: str) -> str:
    """A row label for a claim without a headline label: ``test_mlp_overrepresented`` -> "mlp overrepresented"."""
    return function.removeprefix("test_").replace("_", " ")


def _columns(claims, header: Mapping) -> list[str]:
    """`ACROSS` first (when any claim sits there), then the models in the run's order
    (`esa.claims.report_tables.model_names`), then any other column the claims bring."""
    order = model_names(header)
    seen = list(dict.fromkeys(column_of(c) for c in claims))
    across = [ACROSS] if ACROSS in seen else []  # first: it sums up, and stays in view
    return across + [m for m in order if m in seen] + [c for c in seen if c not in order and c != ACROSS]


def build_matrix(claims, header: Mapping | None = None, headline=HEADLINE) -> dict:
    """The matrix of `claims` (report records): ``columns`` (model names), ``rows`` (each with
    ``label``, ``variant``, ``metric``, ``cells`` = {column: `cell`}), ``headline`` (False when
    fewer than two headline claims ran and the rows are all claims), ``metrics`` (of its claims,
    one per row when several), ``metric_rows`` (whether rows are split by metric). A run with
    fewer than two of the headline claims (one phase, ``-k``) gets all its claims as rows."""
    wanted = dict(headline)
    picked = [c for c in claims if function_name(c) in wanted]
    is_headline = len({function_name(c) for c in picked}) >= 2
    if not is_headline:  # a partial run (one phase, -k): every claim, the headline ones first
        picked = sorted(claims, key=lambda c: function_name(c) not in wanted)
        wanted |= {f: _label(f) for f in dict.fromkeys(function_name(c) for c in picked) if f not in wanted}
    metrics = list(dict.fromkeys(m for c in picked for m in case(c)["metric"] if len(case(c)["metric"]) == 1))
    split = len(metrics) > 1
    order = {f: i for i, f in enumerate(wanted)}
    rows: dict[tuple, dict] = {}
    for c in sorted(picked, key=lambda c: (order[function_name(c)], c.get("id", ""))):
        k = case(c)
        series = names((c.get("context") or {}).get("series"))
        variant = " · ".join(
            series + (k["perturbation"] if len(k["perturbation"]) == 1 else []) + k["variant"]
        )
        metric = ", ".join(k["metric"]) if split else ""
        row = rows.setdefault(
            (function_name(c), metric, variant),
            {"label": wanted[function_name(c)], "variant": variant, "metric": metric, "cells": {}},
        )
        row["cells"].setdefault(column_of(c), cell(c))
    return {
        "columns": _columns(picked, header or {}),
        "rows": list(rows.values()),
        "headline": is_headline,
        "metrics": metrics,
        "metric_rows": split,
    }
