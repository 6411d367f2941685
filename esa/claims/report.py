"""Claims reports: `claims.json`, `claims.md` and a self-contained `claims.html` (Jinja2), the
verdict names and colours, and the comparison with an older claims.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esa.util.files import atomic_write
from esa.util.serialize import decode, encode, plain

__all__ = [
    "compare_claims",
    "count_verdicts",
    "data_rows",
    "fmt",
    "key_measure",
    "load_claims",
    "write_reports",
]

SCHEMA = 1
HOLDS, FALSIFIED, RECORDED, CHANGED = "holds", "falsified", "falsified (recorded)", "changed"
INCONCLUSIVE, ERROR, SKIPPED = "inconclusive", "error", "skipped"
VERDICTS = (HOLDS, FALSIFIED, RECORDED, CHANGED, INCONCLUSIVE, ERROR, SKIPPED)
FAILING = (FALSIFIED, CHANGED, ERROR)  # verdicts that fail the pytest run
COLORS = {
    HOLDS: "#1a7f37",
    FALSIFIED: "#cf222e",
    RECORDED: "#b07d00",
    CHANGED: "#8250df",
    INCONCLUSIVE: "#5b7b9a",
    ERROR: "#6e7781",
    SKIPPED: "#9aa4ae",
}
DOC_SECTIONS = {  # claim docstring section label -> key of the record's "doc"
    "Hypothesis:": "hypothesis",
    "Measurement:": "measurement",
    "Decision:": "decision",
    "Minimum tier:": "minimum_tier",
    "Falsified if:": "falsified_if",
}
PHASES = ("phase1", "phase2", "phase3", "phase4", "phase5")


def load_claims(path) -> dict:
    """Read a claims.json written by `write_reports`, with NaN/inf measured values restored."""
    return decode(json.loads(Path(path).read_text(encoding="utf-8")))


def key_measure(claim: Mapping):
    """(name, value) of the claim's key measurement: the one named `key`, else the first."""
    measured = claim.get("measured") or {}
    name = claim.get("key") if claim.get("key") in measured else next(iter(measured), None)
    if name is None:
        return None, None
    return name, measured[name].get("value")


def phase_of(markers) -> str:
    """The first phaseN marker name in `markers`, else "other"."""
    return next((m for m in markers or () if m in PHASES), "other")


def count_verdicts(claims) -> dict[str, int]:
    """Claims per verdict, every known verdict present (zeros included), unknown ones appended."""
    counts = dict.fromkeys(VERDICTS, 0)
    for c in claims:
        counts[c.get("verdict", ERROR)] = counts.get(c.get("verdict", ERROR), 0) + 1
    return counts


def compare_claims(claims, old) -> tuple[list[dict], dict]:
    """Annotate copies of `claims` with compare status against `old` (path, report dict or list).

    Each claim gets ``compare = {"status": "new" | "same" | "changed verdict", "previous": verdict}``;
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
        out.append({**c, "compare": {"status": status, "previous": prev.get("verdict") if prev else None}})
    now = {c["id"] for c in claims}
    removed = [{"id": i, "verdict": c.get("verdict")} for i, c in sorted(before.items()) if i not in now]
    counts = {s: sum(c["compare"]["status"] == s for c in out) for s in ("new", "same", "changed verdict")}
    counts["removed"] = len(removed)
    return out, {"path": path, "counts": counts, "removed": removed}


def fmt(value) -> str:
    """Short human text for any plain value (numbers to 4 significant digits)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value == 0 or not 1e-3 <= abs(value) < 1e7:
            return f"{value:.4g}"
        text = f"{value:.{max(0, 3 - math.floor(math.log10(abs(value))))}f}"  # 4 significant digits
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(value, Mapping):
        if set(value) >= {"value"}:
            return fmt(value["value"])
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        more = f", … ({len(value)} values)" if len(value) > 12 else ""
        return "[" + ", ".join(fmt(v) for v in value[:12]) + more + "]"
    return str(value)


def _ci(ci) -> str:
    return "" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _mdcell(value) -> str:
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _recorded_value(claim: Mapping, name: str):
    rec = (claim.get("recorded") or {}).get("measured") or {}
    if name not in rec:
        return None
    v = rec[name]
    return v.get("value") if isinstance(v, Mapping) else v


DOC_TITLES = {key: label[:-1] for label, key in DOC_SECTIONS.items()}
_KNOWN_SOURCE = ("name", "path", "sha256", "chars", "windows_total", "windows_used", "windows_pool")


def _disjoint_text(manifest: Mapping) -> bool:
    """The data layer's ``calibration_disjoint`` when the manifest has it, else different sha256."""
    if "calibration_disjoint" in manifest:
        return bool(manifest["calibration_disjoint"])
    ev, cal = manifest["eval"], manifest.get("calibration") or {}
    return bool(cal.get("sha256")) and cal.get("sha256") != ev.get("sha256")


def data_rows(header: Mapping) -> list[dict]:
    """One row per model of the header's data manifests (``header["data"][model]``, from
    ``DataBundle.manifest``): evaluation and calibration text (name, sha256, windows), whether the
    calibration is disjoint from the evaluation text (the manifest's ``calibration_disjoint``, else
    a different sha256), and any further calibration entries (e.g. where it comes from)."""
    manifests = header.get("data")
    rows = []
    for model, m in manifests.items() if isinstance(manifests, Mapping) else ():
        if not isinstance(m, Mapping) or not isinstance(m.get("eval"), Mapping):
            continue
        ev, cal = m["eval"], m.get("calibration") or {}
        rows.append(
            {
                "model": model,
                "eval": ev.get("name"),
                "eval_sha256": ev.get("sha256"),
                "eval_windows": f"{fmt(ev.get('windows_used'))} of {fmt(ev.get('windows_total'))}",
                "calib": cal.get("name"),
                "calib_sha256": cal.get("sha256"),
                "calib_windows": f"pool {fmt(cal.get('windows_pool'))}",
                "disjoint": "yes" if _disjoint_text(m) else "no",
                "more": {k: v for k, v in cal.items() if k not in _KNOWN_SOURCE},
                "max_length": m.get("max_length"),
            }
        )
    return rows


def disjoint(header: Mapping, rows: list[dict]) -> str:
    """ "yes" when every model's calibration text differs from its evaluation text (from the data
    manifests; without any, from the header's evaluation and calibration entries), else "no"."""
    if rows:
        return "yes" if all(r["disjoint"] == "yes" for r in rows) else "no"
    calib, ev = header.get("calib_data_sha256"), header.get("data_sha256")
    builtin_calib = (
        header.get("calib_data") == "built-in corpus" and header.get("eval_data") != "built-in corpus"
    )
    return "yes" if (calib and calib != ev) or builtin_calib else "no"


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
    env.filters.update(fmt=fmt, ci=_ci, mdcell=_mdcell)
    env.globals.update(
        colors=COLORS, key_measure=key_measure, recorded_value=_recorded_value, doc_titles=DOC_TITLES
    )
    return env


def _group(claims) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for c in claims:
        groups.setdefault(c.get("phase") or phase_of(c.get("markers")), []).append(c)
    order = {p: i for i, p in enumerate(PHASES)}
    return sorted(groups.items(), key=lambda kv: order.get(kv[0], len(order)))


def write_reports(claims, header: Mapping, out_dir, compare=None) -> dict[str, Path]:
    """Write claims.json, claims.md and claims.html into `out_dir` (atomically); return their paths.

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
    paths = {"json": out / "claims.json", "md": out / "claims.md", "html": out / "claims.html"}
    env = _environment()
    rows = data_rows(head)
    ctx = {
        "header": head,
        "claims": claims,
        "groups": _group(claims),
        "verdicts": VERDICTS,
        "data_rows": rows,
        "disjoint": disjoint(head, rows),
    }
    atomic_write(paths["json"], json.dumps(encode(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    atomic_write(paths["md"], env.get_template("claims.md.j2").render(**ctx))
    atomic_write(paths["html"], env.get_template("claims.html.j2").render(**ctx))
    return paths
