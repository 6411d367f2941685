"""The call-phase verdict of a claim, and the pytest report made to agree with it.

Only `ClaimFalsified` falsifies; `ClaimInconclusive` (or a run below the claim's ``min_tier``
marker, whatever the check said) is inconclusive and reports as a skip; any other exception is an
error. A claim expected to be falsified (a recorded outcome's ``xfail(strict=True,
raises=ClaimFalsified)``, or an xfail marked by hand) is "falsified (recorded)" only when it
raises `ClaimFalsified` and, for a recorded entry, its threshold and key value still agree with
the entry (``esa.claims.recorded.changed``); otherwise it is changed (or error) and fails the run.
Run verdicts: holds, falsified (recorded), inconclusive and skipped pass; falsified, changed
and error fail.
"""

from __future__ import annotations

import pytest

from esa.claims.claim import (
    RECORDED_KEY,
    ClaimFalsified,
    ClaimInconclusive,
    claim_for,
    min_tier_of,
    phase_message,
)
from esa.claims.recorded import RERECORD, changed
from esa.claims.report import CHANGED, ERROR, FALSIFIED, HOLDS, INCONCLUSIVE, RECORDED, SKIPPED
from esa.claims.tiers import TIERS, Tier

Decided = tuple[str, str, str]  # (verdict, pytest outcome, message)


def check_min_tier(item: pytest.Item) -> None:
    """UsageError (one line) when the item's ``min_tier`` marker names no tier of `TIERS`."""
    spec = min_tier_of(item)
    if spec is not None and spec["tier"] not in TIERS:
        raise pytest.UsageError(
            f"{item.nodeid}: min_tier {spec['tier']!r} is not a tier; use one of {', '.join(TIERS)}"
        )


def below_min_tier(item: pytest.Item, tier: Tier) -> str | None:
    """Why the session's `tier` cannot decide the claim (tiers ordered as `TIERS`), else None."""
    spec = min_tier_of(item)
    order = list(TIERS)
    if spec is None or order.index(tier.name) >= order.index(spec["tier"]):
        return None
    return f"below the minimum tier {spec['tier']} (this run: {tier.name}): {spec['reason'] or 'no reason given'}"


def _fail(report: pytest.TestReport, text: str | None = None) -> None:
    report.outcome = "failed"
    if hasattr(report, "wasxfail"):
        del report.wasxfail
    if text is not None:
        report.longrepr = text


def _skip(item: pytest.Item, report: pytest.TestReport, text: str) -> None:
    report.outcome = "skipped"
    if hasattr(report, "wasxfail"):
        del report.wasxfail
    report.longrepr = (str(item.path), (item.location[1] or 0) + 1, text)


def _kind(call: pytest.CallInfo) -> str:
    exc = call.excinfo
    if exc is None:
        return HOLDS
    if exc.errisinstance(ClaimFalsified):
        return FALSIFIED
    if exc.errisinstance(ClaimInconclusive):
        return INCONCLUSIVE
    return SKIPPED if exc.errisinstance(pytest.skip.Exception) else ERROR


def decide(item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport, tier: Tier) -> Decided:
    """The claim's verdict for its call phase; `report` is changed to fail, pass or skip as the
    verdict says (see the module docstring)."""
    kind, msg = _kind(call), phase_message(call, report)
    expected = item.get_closest_marker("xfail") is not None  # recorded, or marked by hand
    entry = item.stash.get(RECORDED_KEY, None)
    below = below_min_tier(item, tier)
    if below and kind in (HOLDS, FALSIFIED):
        would = "holds" if kind == HOLDS else msg
        note = "; its recorded falsification does not apply" if entry else ""
        text = f"inconclusive: {below} (would be: {would}){note}"
        _skip(item, report, text)
        return INCONCLUSIVE, "skipped", text
    if kind == HOLDS:
        if not expected:
            return HOLDS, "passed", ""
        xpass = f"[XPASS] {report.wasxfail}" if hasattr(report, "wasxfail") else msg
        return CHANGED, "xpassed", xpass
    if kind == FALSIFIED:
        if not expected:
            return FALSIFIED, "failed", msg
        c = claim_for(item)
        why = changed(entry, c.measured, c.threshold) if entry else None
        if why is None:
            return RECORDED, "xfailed", msg
        _fail(report, f"changed: {why}\n({msg})")
        return CHANGED, "failed", f"changed: {why}"
    if kind == INCONCLUSIVE:
        if not expected:
            _skip(item, report, msg)
            return INCONCLUSIVE, "skipped", msg
        hint = f"; {RERECORD}" if entry else ""
        text = f"changed: expected falsified ({'recorded' if entry else 'xfail'}), now {msg}{hint}"
        _fail(report, text)
        return CHANGED, "failed", text
    if kind == SKIPPED:
        return SKIPPED, "skipped", msg
    if not report.failed:  # an xfail without raises= took the exception for a falsification
        _fail(report)
    return ERROR, "failed", msg
