"""``Claim``: what one experiment states and measures, and its verdict bookkeeping.

The verdict is the test outcome: pass = holds, failed check/assert = falsified, any other
exception (setup, call or teardown) = error, xfail = falsified (recorded), xpass = changed,
skip = skipped. The plugin feeds every phase report to `Claim.observe`; `Claim.record` is the
plain-dict record that lands in the reports.
"""

from __future__ import annotations

import base64
import operator
import os
from pathlib import Path
from typing import Any

import pytest

from esa.claims.recorded import claim_id
from esa.claims.report import CHANGED, ERROR, FALSIFIED, HOLDS, RECORDED, SKIPPED, phase_of
from esa.util.serialize import plain

SKIP_MARKERS = {"parametrize", "usefixtures", "filterwarnings", "xfail", "skip", "skipif", "xdist_group"}
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


class Claim:
    """What one experiment states and measures; the test outcome is its verdict."""

    def __init__(self, statement: str = "", threshold=None, key: str | None = None):
        self.statement, self.threshold, self.key = statement, plain(threshold), key
        self.measured: dict[str, dict] = {}
        self.ctx: dict = {}
        self.figures: list[dict] = []
        self.checks: list[dict] = []
        self._phases: dict[str, Phase] = {}

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
        """Attach a matplotlib Figure (converted to PNG now, then closed) or PNG bytes / path."""
        if isinstance(fig, (bytes, bytearray, memoryview)):
            data = base64.b64encode(bytes(fig)).decode("ascii")
        elif isinstance(fig, (str, os.PathLike)):
            data = base64.b64encode(Path(fig).read_bytes()).decode("ascii")
        else:
            from esa.plots import figure_to_base64

            data = figure_to_base64(fig)
        self.figures.append({"caption": str(caption), "png_base64": data})
        return self

    def check(self, condition, message: str) -> bool:
        """Record a check; when false, fail the test (the claim is falsified) with `message`."""
        ok = bool(condition)
        self.checks.append({"ok": ok, "message": str(message)})
        if not ok:
            pytest.fail(f"claim falsified: {message}", pytrace=False)
        return True

    def expect(self, value, op: str, threshold=None, *, name: str | None = None) -> bool:
        """Check ``value <op> threshold`` (op in < <= > >= == !=; threshold defaults to the
        claim's); with `name` the value is also measured. NaN never satisfies < <= > >= ==."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}: use one of {' '.join(OPS)}")
        threshold = self.threshold if threshold is None else plain(threshold)
        value = plain(value)
        if name is not None:
            self.measure(name, value)
        try:
            ok = bool(OPS[op](value, threshold))
        except TypeError:
            ok = False
        text = f"{name or 'value'} = {_num(value)} {op} {_num(threshold)}"
        return self.check(ok, text if ok else f"{text} does not hold")

    def observe(self, call: pytest.CallInfo, report: pytest.TestReport) -> None:
        """Turn one phase report into (verdict, outcome, message, duration)."""
        when, xf = report.when, hasattr(report, "wasxfail")
        exc, msg = call.excinfo, report.longrepr if isinstance(report.longrepr, str) else ""
        if exc is not None:  # pytest.fail/skip/xfail: their message; anything else: "Type: message"
            outcome_exc = isinstance(exc.value, (pytest.fail.Exception, pytest.skip.Exception))
            msg = str(exc.value) if outcome_exc else f"{exc.typename}: {exc.value}"
        verdict: str | None
        outcome: str | None
        if report.failed and when != "call":
            verdict, outcome = ERROR, "error"
        elif report.failed:  # no exception: strict XPASS; only a failed check/assert falsifies
            if exc is None:
                verdict, outcome = CHANGED, "xpassed"
            else:
                falsified = exc.errisinstance((AssertionError, pytest.fail.Exception))
                verdict, outcome = (FALSIFIED if falsified else ERROR), "failed"
        elif report.skipped:
            verdict = RECORDED if xf and when == "call" else SKIPPED
            outcome = "xfailed" if verdict == RECORDED else "skipped"
            msg = msg or (report.longrepr[2] if isinstance(report.longrepr, tuple) else "")
        elif when == "call":
            verdict, outcome = (CHANGED, "xpassed") if xf else (HOLDS, "passed")
            msg = f"[XPASS] {report.wasxfail}" if xf else ""
        else:
            verdict = outcome = None
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
            }
        )


CLAIM_KEY = pytest.StashKey[Claim]()


def claim_for(item: pytest.Item) -> Claim:
    """The item's `Claim`, created on first use with the test's docstring (first line) as statement."""
    if CLAIM_KEY not in item.stash:
        doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
        item.stash[CLAIM_KEY] = Claim(doc.splitlines()[0] if doc else item.name)
    return item.stash[CLAIM_KEY]
