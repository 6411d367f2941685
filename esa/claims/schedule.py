"""Longest groups first: the order in which ``--dist loadgroup`` hands out work.

xdist's group scheduler hands out groups by their number of tests, so on two workers a group of
few but long claims (phase 3's gauss_noise dose claims: 45 evaluations) may start last and run
alone while the other worker idles. `LongestFirst` hands out the groups by the time the last
report of the tier measured for their claims (``claims.json`` ``duration``, summed per group;
unknown tests count 0 and keep xdist's order), longest first: the greedy LPT order. It changes
only which worker runs what, and when; never what a claim measures.
"""

from __future__ import annotations

import json
from pathlib import Path

from xdist.scheduler import LoadGroupScheduling


def last_durations(report_dir: Path | None) -> dict[str, float]:
    """Claim id -> seconds in the report at ``report_dir`` (empty when there is none or it is
    unreadable: the order then stays xdist's)."""
    path = None if report_dir is None else Path(report_dir) / "claims.json"
    try:
        claims = json.loads(path.read_text(encoding="utf-8"))["claims"] if path else []
        return {str(c["id"]): float(c.get("duration") or 0.0) for c in claims}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class LongestFirst(LoadGroupScheduling):
    """`LoadGroupScheduling` whose work units go out longest (by ``durations``) first."""

    def __init__(self, config, log=None, durations: dict[str, float] | None = None):
        super().__init__(config, log)
        self.durations, self._ordered = durations or {}, False

    def _cost(self, scope: str) -> float:
        return sum(self.durations.get(_claim_id(nodeid), 0.0) for nodeid in self.workqueue[scope])

    def _assign_work_unit(self, node) -> None:
        if not self._ordered:  # the queue is complete at the first assignment
            self._ordered = True
            for scope in sorted(
                self.workqueue, key=self._cost, reverse=True
            ):  # stable: ties keep xdist's order
                self.workqueue.move_to_end(scope)
        super()._assign_work_unit(node)


def _claim_id(nodeid: str) -> str:
    """The node id without xdist's ``@group`` suffix (xdist's own rule for where it starts)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid
