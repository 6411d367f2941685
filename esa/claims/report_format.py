"""What every claims-report writer shares: verdict names and colours, the docstring sections,
phases, a claim's key measurement and case (model / metric / perturbation / variant), its anchor,
and short human text for values (`fmt`) in HTML, Markdown and LaTeX."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

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
TINTS = {  # cell backgrounds of the claims x models matrix (the colour at ~15% on white)
    HOLDS: "#dcf0e0",
    FALSIFIED: "#fadbdd",
    RECORDED: "#f6ecd0",
    CHANGED: "#ebe1fa",
    INCONCLUSIVE: "#e3eaf1",
    ERROR: "#e8eaed",
    SKIPPED: "#f1f3f5",
}
MARKS = {  # the verdict's colour in plain text (Markdown twin, terminals)
    HOLDS: "🟢",
    FALSIFIED: "🔴",
    RECORDED: "🟠",
    CHANGED: "🟣",
    INCONCLUSIVE: "🔵",
    ERROR: "⚫",
    SKIPPED: "⚪",
}
DOC_SECTIONS = {  # claim docstring section label -> key of the record's "doc"
    "Hypothesis:": "hypothesis",
    "Measurement:": "measurement",
    "Decision:": "decision",
    "Minimum tier:": "minimum_tier",
    "Falsified if:": "falsified_if",
}
DOC_TITLES = {key: label[:-1] for label, key in DOC_SECTIONS.items()}
PHASES = ("phase1", "phase2", "phase3", "phase4", "phase5")
VARIANT_KEYS = ("bit", "measure", "dtype", "position")  # context keys a claim is parametrized over


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


def phase_title(phase: str) -> str:
    """ "phase3" -> "Phase 3"; anything else -> "Other claims"."""
    return phase.replace("phase", "Phase ") if phase in PHASES else "Other claims"


def count_verdicts(claims) -> dict[str, int]:
    """Claims per verdict, every known verdict present (zeros included), unknown ones appended."""
    counts = dict.fromkeys(VERDICTS, 0)
    for c in claims:
        counts[c.get("verdict", ERROR)] = counts.get(c.get("verdict", ERROR), 0) + 1
    return counts


def function_name(claim: Mapping) -> str:
    """The test function of a claim: ``file.py::test_x[a-b]`` -> ``test_x``."""
    return str(claim.get("name") or claim.get("id", "")).rsplit("::", 1)[-1].split("[", 1)[0]


def anchor(claim: Mapping) -> str:
    """A stable HTML id / file stem for a claim: its id without folders and ``.py``, every run of
    characters other than letters, digits, ``_`` and ``.`` as one ``-``.

    >>> anchor({"id": "experiments/test_p3.py::test_x[tiny-a-zero]"})
    'test_p3-test_x-tiny-a-zero'
    """
    text = str(claim.get("id", "")).rsplit("/", 1)[-1].replace(".py::", "::")
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "claim"


def names(value) -> list[str]:
    """A context entry as a list of names: a string -> [it], a list -> its items, None -> []."""
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def case(claim: Mapping) -> dict[str, list[str]]:
    """What a claim was measured on, from its context: ``model`` (or the ``series`` of a scaling
    claim), ``metric``, ``perturbation`` and ``variant`` (``bit sign``, ``measure r2``, ...)."""
    ctx = claim.get("context") or {}
    return {
        "model": names(ctx.get("model") if ctx.get("model") is not None else ctx.get("series")),
        "metric": names(ctx.get("metric")),
        "perturbation": names(ctx.get("perturbation")),
        "variant": [f"{k} {fmt(ctx[k])}" for k in VARIANT_KEYS if isinstance(ctx.get(k), (str, int))],
    }


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


def fmt_ci(ci) -> str:
    """ "[low, high]" of a CI, "" without one."""
    return "" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def mdcell(value) -> str:
    """Text safe inside a Markdown table cell (pipes and backslashes escaped, one line)."""
    text = value if isinstance(value, str) else fmt(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
