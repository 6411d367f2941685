"""``Claim``: what one experiment states and measures, and its verdict bookkeeping.

Verdicts (``esa.claims.verdict.decide`` maps the call phase): no exception = holds,
`ClaimFalsified` (``check``/``expect``) = falsified, `ClaimInconclusive` (``inconclusive``,
``require_finite``, a non-finite ``expect``, or a run below the ``min_tier`` marker) =
inconclusive, any other exception (setup, call or teardown; a bare assert or pytest.fail too) =
error, a matching recorded falsification = falsified (recorded), a recorded one that passes or
moved = changed, skip = skipped. The plugin feeds every phase report to `Claim.observe`;
`Claim.record` is the plain-dict record that lands in the reports.
"""

from __future__ import annotations

import base64
import inspect
import math
import operator
import os
from pathlib import Path
from typing import Any

import pytest

from esa.claims.recorded import claim_id
from esa.claims.report import DOC_SECTIONS, ERROR, SKIPPED, phase_of
from esa.util.serialize import plain

SKIP_MARKERS = {
    "parametrize",
    "usefixtures",
    "filterwarnings",
    "xfail",
    "skip",
    "skipif",
    "xdist_group",
    "min_tier",
    "shares",
}
OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
Phase = tuple[Any, Any, str, float]  # (verdict, outcome, message, duration) of one test phase
RECORDED_KEY = pytest.StashKey[dict[str, Any]]()  # the recorded entry an item matched (+ "model")


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


class ClaimFalsified(AssertionError):
    """The claim's own decision rule came out false (``Claim.check``/``Claim.expect``).

    Only this exception falsifies a claim: a recorded falsified outcome is a strict
    ``xfail(raises=ClaimFalsified)``, so any other exception is an error that fails the run."""


class ClaimInconclusive(Exception):
    """The measurement cannot decide the claim (non-finite, or below the claim's minimum tier):
    verdict ``inconclusive``, which neither holds nor fails the run."""


def finite(value: Any) -> bool:
    """True for a finite real number (bools and ints count; NaN, inf, None and strings do not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def phase_message(call: pytest.CallInfo, report: pytest.TestReport) -> str:
    """A phase's message: pytest.fail/skip and the claim's own exceptions their text, other
    exceptions "Type: message",
    else the report's text (a skip reason, an XPASS line)."""
    exc = call.excinfo
    if exc is not None:
        own = (pytest.fail.Exception, pytest.skip.Exception, ClaimFalsified, ClaimInconclusive)
        outcome_exc = isinstance(exc.value, own)
        return str(exc.value) if outcome_exc else f"{exc.typename}: {exc.value}"
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return report.longrepr if isinstance(report.longrepr, str) else ""


def parse_doc(docstring: str | None) -> dict[str, str]:
    """The docstring's sections (lines starting ``Hypothesis:``, ``Measurement:``, ``Decision:``,
    ``Minimum tier:``, ``Falsified if:``; a section runs to the next one or a blank line) as
    {"hypothesis": ..., "measurement": ..., "decision": ..., "minimum_tier": ..., "falsified_if": ...}."""
    doc: dict[str, str] = {}
    current: str | None = None
    for line in inspect.cleandoc(docstring or "").splitlines()[1:]:
        text = line.strip()
        label = next((lb for lb in DOC_SECTIONS if text.startswith(lb)), None)
        if label is not None:
            current = DOC_SECTIONS[label]
            doc[current] = text[len(label) :].strip()
        elif not text:
            current = None
        elif current is not None:
            doc[current] = f"{doc[current]} {text}".strip()
    return doc


class Claim:
    """What one experiment states and measures; the test outcome is its verdict."""

    def __init__(self, statement: str = "", threshold=None, key: str | None = None):
        self.statement, self.threshold, self.key = statement, plain(threshold), key
        self.measured: dict[str, dict] = {}
        self.ctx: dict = {}
        self.figures: list[dict] = []
        self.checks: list[dict] = []
        self.doc: dict[str, str] = {}
        self.vector_figures = True  # PDF/SVG copies of figures (the claim fixture: off at the cheapest tier)
        self._phases: dict[str, Phase] = {}
        self.peak_memory: dict | None = None  # esa.util.memory.peak of the call phase (the plugin)

    def __call__(self, statement: str | None = None, *, threshold=None, key: str | None = None) -> Claim:
        """Set the statement (default: the test's docstring), threshold and key measurement."""
        self.statement = str(statement) if statement is not None else self.statement
        self.threshold = plain(threshold)
        self.key = key if key is not None else self.key
        return self

    def measure(self, name: str, value, ci=None, *, key: bool = False) -> Claim:
        """Record a measured value (plain Python; NaN/inf kept) with an optional (low, high) CI."""
        ci = None if ci is None else [plain(ci[0]), plain(ci[1])]
        self.measured[str(name)] = {"value": plain(value), "ci": ci}
        if key:
            self.key = str(name)
        return self

    def context(self, **info) -> Claim:
        """Record what was measured: model=, metric=, perturbation=, seeds=, ..."""
        self.ctx.update(plain(info))
        return self

    def figure(self, fig, caption: str = "") -> Claim:
        """Attach a matplotlib Figure (rendered now as PNG, plus PDF and SVG copies that the
        report saves next to the PNG for papers when `vector_figures`; then closed) or PNG bytes /
        path."""
        vector: dict[str, bytes] = {}
        if isinstance(fig, (bytes, bytearray, memoryview)):
            png = bytes(fig)
        elif isinstance(fig, (str, os.PathLike)):
            png = Path(fig).read_bytes()
        else:
            from esa.plots import VECTOR_FORMATS, render

            vector = render(fig, ("png", *VECTOR_FORMATS) if self.vector_figures else ("png",))
            png = vector.pop("png")
        record: dict[str, Any] = {
            "caption": str(caption),
            "png_base64": base64.b64encode(png).decode("ascii"),
        }
        if vector:
            record["vector"] = {f: base64.b64encode(b).decode("ascii") for f, b in vector.items()}
        self.figures.append(record)
        return self

    def check(self, condition, message: str) -> bool:
        """Record a check; when false, raise `ClaimFalsified` (the claim is falsified) with `message`."""
        __tracebackhide__ = True  # pytest shows the claim's line, not this one
        ok = bool(condition)
        self.checks.append({"ok": ok, "message": str(message)})
        if not ok:
            raise ClaimFalsified(f"claim falsified: {message}")
        return True

    def inconclusive(self, reason: str) -> None:
        """Stop here: the measurements cannot decide the claim (raises `ClaimInconclusive`)."""
        __tracebackhide__ = True
        self.checks.append({"ok": None, "message": f"inconclusive: {reason}"})
        raise ClaimInconclusive(f"claim inconclusive: {reason}")

    def require_finite(self, **values: Any) -> None:
        """Inconclusive unless every value is a finite number (NaN/inf never decide a claim)."""
        __tracebackhide__ = True
        bad = {k: v for k, v in values.items() if not finite(v)}
        if bad:
            self.inconclusive(
                "non-finite measurement " + ", ".join(f"{k} = {_num(v)}" for k, v in bad.items())
            )

    def expect(self, value, op: str, threshold=None, *, name: str | None = None) -> bool:
        """Check ``value <op> threshold`` (op in < <= > >= == !=; threshold defaults to the
        claim's); with `name` the value is also measured. A non-finite value or threshold (NaN,
        inf, None) decides nothing: the claim is inconclusive."""
        __tracebackhide__ = True
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}: use one of {' '.join(OPS)}")
        threshold = self.threshold if threshold is None else plain(threshold)
        value = plain(value)
        if name is not None:
            self.measure(name, value)
        self.require_finite(**{name or "value": value, "threshold": threshold})
        ok = bool(OPS[op](value, threshold))
        text = f"{name or 'value'} = {_num(value)} {op} {_num(threshold)}"
        return self.check(ok, text if ok else f"{text} does not hold")

    def observe(
        self, call: pytest.CallInfo, report: pytest.TestReport, decided: tuple[str, str, str] | None = None
    ) -> None:
        """Keep one phase's (verdict, outcome, message, duration); the call phase comes `decided`
        by ``esa.claims.verdict.decide``, setup and teardown only error or skip."""
        when = report.when
        verdict: str | None
        outcome: str | None
        if decided is not None:
            verdict, outcome, msg = decided
        elif report.failed:
            verdict, outcome, msg = ERROR, "error", phase_message(call, report)
        elif report.skipped:
            verdict, outcome, msg = SKIPPED, "skipped", phase_message(call, report)
        else:
            verdict, outcome, msg = None, None, ""
        self._phases[when] = (verdict, outcome, msg[:4000], report.duration)

    def record(self, item: pytest.Item) -> dict:
        """The plain-dict record for the report (verdict from the phases seen so far)."""
        ph = self._phases
        bad = next((ph[w] for w in ("setup", "teardown") if w in ph and ph[w][0] == ERROR), None)
        verdict, outcome, msg, _ = bad or ph.get("call") or ph.get("setup") or (ERROR, "error", "", 0)
        if verdict is None:
            verdict, outcome, msg = ERROR, "error", "test did not run"
        markers = list(dict.fromkeys(m.name for m in item.iter_markers() if m.name not in SKIP_MARKERS))
        return plain(
            {
                "id": claim_id(item),
                "name": item.name,
                "phase": phase_of(markers),
                "markers": markers,
                "statement": self.statement,
                "doc": self.doc,
                "min_tier": min_tier_of(item),
                "threshold": self.threshold,
                "key": self.key,
                "measured": self.measured,
                "context": self.ctx,
                "checks": self.checks,
                "figures": self.figures,
                "recorded": item.stash.get(RECORDED_KEY, None),
                "verdict": verdict,
                "outcome": outcome,
                "message": msg,
                "duration": round(sum(p[3] for p in ph.values()), 4),
                "peak_memory": self.peak_memory,
            }
        )


CLAIM_KEY = pytest.StashKey[Claim]()


def claim_for(item: pytest.Item) -> Claim:
    """The item's `Claim`, created on first use: the docstring's first line is the statement, its
    sections (`parse_doc`) the claim's documentation."""
    if CLAIM_KEY not in item.stash:
        doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
        c = item.stash[CLAIM_KEY] = Claim(doc.splitlines()[0] if doc else item.name)
        c.doc = parse_doc(doc)
    return item.stash[CLAIM_KEY]


def min_tier_of(item: pytest.Item) -> dict | None:
    """``{"tier", "reason"}`` of the item's ``min_tier`` marker
    (``@pytest.mark.min_tier("standard", reason="...")``), else None."""
    m = item.get_closest_marker("min_tier")
    if m is None:
        return None
    tier = m.args[0] if m.args else m.kwargs.get("tier")
    reason = m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")
    return {"tier": str(tier), "reason": str(reason)}
