"""Claims reports: `claims.json`, `claims.md`, a self-contained `claims.html` (Jinja2), LaTeX
tables (`claims_tables.tex`) and the claim figures as files (``figures/``: PNG, PDF, SVG); the
comparison with an older claims.json.

The HTML and its Markdown twin open with the answer: the claims x models matrix
(`esa.claims.report_matrix`), then a contents list, the run header as tables
(`esa.claims.report_tables`), the ΔPPL table, and per phase each claim's details. The verdict
names, colours and value formatting live in `esa.claims.report_format` (re-exported here).
"""

from __future__ import annotations

import base64
import json
import os
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esa.claims.report_format import (
    CHANGED,
    COLORS,
    DOC_SECTIONS,
    DOC_TITLES,
    ERROR,
    FAILING,
    FALSIFIED,
    HOLDS,
    INCONCLUSIVE,
    MARKS,
    PHASES,
    RECORDED,
    SCHEMA,
    SKIPPED,
    TINTS,
    VERDICTS,
    anchor,
    case,
    count_verdicts,
    fmt,
    fmt_ci,
    key_measure,
    mdcell,
    phase_of,
    phase_title,
)
from esa.claims.report_latex import latex_tables
from esa.claims.report_matrix import build_matrix
from esa.claims.report_tables import (
    data_rows,
    delta_ppl_rows,
    delta_ppl_table,
    disjoint,
    models_table,
    run_rows,
    tier_table,
    versions_table,
)
from esa.util.files import atomic_write
from esa.util.serialize import decode, encode, plain

__all__ = [
    "CHANGED",
    "DOC_SECTIONS",
    "ERROR",
    "FAILING",
    "FALSIFIED",
    "HOLDS",
    "INCONCLUSIVE",
    "RECORDED",
    "SCHEMA",
    "SKIPPED",
    "VERDICTS",
    "compare_claims",
    "count_verdicts",
    "data_rows",
    "fmt",
    "key_measure",
    "load_claims",
    "phase_of",
    "write_reports",
]
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def load_claims(path) -> dict:
    """Read a claims.json written by `write_reports`, with NaN/inf measured values restored."""
    return decode(json.loads(Path(path).read_text(encoding="utf-8")))


def _values(claim: Mapping | None) -> dict:
    return {
        k: m.get("value") for k, m in ((claim or {}).get("measured") or {}).items() if isinstance(m, Mapping)
    }


def compare_claims(claims, old) -> tuple[list[dict], dict]:
    """Annotate copies of `claims` with compare status against `old` (path, report dict or list).

    Each claim gets ``compare = {"status": "new" | "same" | "changed verdict", "previous":
    verdict, "measured": {name: previous value}}`` (the values side by side in the reports);
    the summary lists claims present in `old` only as "removed".
    """
    path = None
    if isinstance(old, (str, os.PathLike)):
        path, old = os.fspath(old), load_claims(old)
    old_claims = old.get("claims", []) if isinstance(old, Mapping) else list(old)
    before = {c["id"]: c for c in old_claims}
    out = []
    for c in claims:
        prev = before.get(c["id"])
        if prev is None:
            status = "new"
        else:
            status = "same" if prev.get("verdict") == c.get("verdict") else "changed verdict"
        previous = prev.get("verdict") if prev else None
        out.append({**c, "compare": {"status": status, "previous": previous, "measured": _values(prev)}})
    now = {c["id"] for c in claims}
    removed = [{"id": i, "verdict": c.get("verdict")} for i, c in sorted(before.items()) if i not in now]
    counts = {s: sum(c["compare"]["status"] == s for c in out) for s in ("new", "same", "changed verdict")}
    counts["removed"] = len(removed)
    return out, {"path": path, "counts": counts, "removed": removed}


def _recorded_value(claim: Mapping, name: str):
    rec = (claim.get("recorded") or {}).get("measured") or {}
    if name not in rec:
        return None
    v = rec[name]
    return v.get("value") if isinstance(v, Mapping) else v


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("esa.claims", "templates"),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=fmt, ci=fmt_ci, mdcell=mdcell)
    env.globals.update(
        colors=COLORS,
        tints=TINTS,
        marks=MARKS,
        key_measure=key_measure,
        recorded_value=_recorded_value,
        doc_titles=DOC_TITLES,
        anchor=anchor,
        case=case,
        phase_title=phase_title,
    )
    return env


def _group(claims) -> list[tuple[str, list[dict], dict[str, int], list[str]]]:
    """(phase, its claims, its verdict counts without zeros, the case columns any of its claims
    fills: model / metric / perturbation / variant), phases in order, "other" last."""
    groups: dict[str, list[dict]] = {}
    for c in claims:
        groups.setdefault(c.get("phase") or phase_of(c.get("markers")), []).append(c)
    order = {p: i for i, p in enumerate(PHASES)}
    ordered = sorted(groups.items(), key=lambda kv: order.get(kv[0], len(order)))
    out = []
    for p, items in ordered:
        cols = [k for k in ("model", "metric", "perturbation", "variant") if any(case(c)[k] for c in items)]
        out.append((p, items, {v: n for v, n in count_verdicts(items).items() if n}, cols))
    return out


def save_figures(claims, folder: Path) -> dict[str, list[list[str]]]:
    """Write every claim figure into `folder` as ``<anchor>-<n>.png`` and the PDF/SVG copies the
    claim captured; remove figure files of an earlier report that this one does not write.
    Returns {anchor: per figure its file paths relative to the report}. A failure only warns."""
    files: dict[str, list[list[str]]] = {}
    written: set[str] = set()
    try:
        for c in claims:
            for i, f in enumerate(c.get("figures") or [], 1):
                blobs = {"png": f.get("png_base64"), **(f.get("vector") or {})}
                paths = []
                for ext, data in blobs.items():
                    if data:
                        folder.mkdir(parents=True, exist_ok=True)
                        name = f"{anchor(c)}-{i}.{ext}"
                        atomic_write(folder / name, base64.b64decode(data))
                        written.add(name)
                        paths.append(f"{folder.name}/{name}")
                files.setdefault(anchor(c), []).append(paths)
        for old in folder.iterdir() if folder.is_dir() else ():
            if old.suffix in FIGURE_SUFFIXES and old.name not in written:
                old.unlink()
    except (OSError, ValueError) as exc:
        warnings.warn(f"esa: claim figures not saved in {folder}: {exc}", RuntimeWarning, stacklevel=2)
    return files


def report_context(claims: list[dict], head: dict, figure_files: Mapping | None = None) -> dict[str, Any]:
    """What the templates and the LaTeX writer lay out: matrix, header tables, ΔPPL table, phases."""
    rows = data_rows(head)
    matrix = build_matrix(claims, head)
    delta = delta_ppl_rows(claims, matrix["columns"])
    return {
        "header": head,
        "claims": claims,
        "matrix": matrix,
        "groups": _group(claims),
        "verdicts": VERDICTS,
        "data_rows": rows,
        "disjoint": disjoint(head, rows),
        "run_rows": run_rows(head),
        "versions": versions_table(head),
        "tier": tier_table(head),
        "models": models_table(head, claims),
        "delta_rows": delta,
        "delta": delta_ppl_table(delta),
        "figure_files": figure_files or {},
    }


def write_reports(claims, header: Mapping, out_dir, compare=None) -> dict[str, Path]:
    """Write claims.json, claims.md, claims.html, claims_tables.tex and figures/ into `out_dir`
    (atomically, files 0666 & ~umask); return the paths of the four files.

    `claims` are plain dicts as built by the esa pytest plugin (sorted here by id); `compare` is an
    older claims.json (path or loaded dict) to diff against.
    """
    claims = sorted((plain(c) for c in claims), key=lambda c: c["id"])
    head: dict[str, Any] = plain(dict(header))
    if compare is not None:
        claims, head["compare"] = compare_claims(claims, compare)
    head.setdefault("generated", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    head["counts"] = count_verdicts(claims)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "header": head, "claims": claims}
    paths = {  # the page to open last
        "json": out / "claims.json",
        "tex": out / "claims_tables.tex",
        "md": out / "claims.md",
        "html": out / "claims.html",
    }
    atomic_write(paths["json"], json.dumps(encode(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    ctx = report_context(claims, head, save_figures(claims, out / "figures"))
    env = _environment()
    atomic_write(paths["md"], env.get_template("claims.md.j2").render(**ctx))
    atomic_write(paths["html"], env.get_template("claims.html.j2").render(**ctx))
    tier = head.get("tier")
    tier_name = str(tier.get("name", "")) if isinstance(tier, Mapping) else str(tier or "")
    atomic_write(paths["tex"], latex_tables(ctx["matrix"], ctx["delta_rows"], tier_name))
    return paths
