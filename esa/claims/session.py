"""``ClaimsSession``: the controller's side of a claims run.

Each test's claim record travels as JSON in ``report.user_properties`` (name `PROPERTY`), so it
reaches the controller from xdist workers too; header entries that worker fixtures wrote come
back through ``workeroutput["esa_header"]``. Only the controller writes the reports and prints
the summary.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from esa.claims.options import HEADER_KEY, OPTIONS_KEY
from esa.claims.report import (
    CHANGED,
    ERROR,
    FALSIFIED,
    HOLDS,
    INCONCLUSIVE,
    RECORDED,
    SKIPPED,
    count_verdicts,
    fmt,
    key_measure,
)
from esa.claims.shared import WORKER_INPUT, make_root, remove_root
from esa.util.serialize import decode, plain

PROPERTY = "esa_claim"  # user_properties name carrying one JSON claim record
WORKER_HEADER = "esa_header"  # workeroutput key carrying the header entries of a worker
MARKUP = {
    HOLDS: {"green": True},
    FALSIFIED: {"red": True, "bold": True},
    RECORDED: {"yellow": True},
    CHANGED: {"purple": True, "bold": True},
    INCONCLUSIVE: {"blue": True},
    ERROR: {"red": True},
    SKIPPED: {},
}


def merge_header(into: dict[str, Any], entries: dict[str, Any]) -> dict[str, Any]:
    """Merge `entries` into `into` (and return it); mapping values merge one level deep, so the
    per-model entries (``data``, ``models``) of several xdist workers add up."""
    for k, v in entries.items():
        old = into.get(k)
        into[k] = {**old, **v} if isinstance(old, dict) and isinstance(v, dict) else v
    return into


def is_controller(config: pytest.Config) -> bool:
    """True unless this process is an xdist worker."""
    return not hasattr(config, "workerinput")


class ClaimsSession:
    """Controller-only plugin: gathers claim records, writes the reports, prints the summary."""

    def __init__(self, config: pytest.Config):
        self.config, self.options, self.start = config, config.stash[OPTIONS_KEY], time.time()
        self.claims: dict[str, dict] = {}  # id -> record
        self.worker_header: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        self.error: str | None = None
        self.shared_dir: str | None = None  # made when the first xdist worker starts

    def pytest_sessionstart(self) -> None:
        self.start = time.time()

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """xdist: hand every worker the session's shared-results directory (`esa.claims.shared`)."""
        if self.shared_dir is None:
            self.shared_dir = make_root()
        node.workerinput[WORKER_INPUT] = self.shared_dir

    def pytest_unconfigure(self) -> None:
        remove_root(self.shared_dir)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Take claim records out of user_properties (one per test, on the teardown report)."""
        props = report.user_properties
        for value in [v for k, v in props if k == PROPERTY]:
            rec = decode(json.loads(str(value)))
            self.claims[rec["id"]] = rec
        props[:] = [(k, v) for k, v in props if k != PROPERTY]  # keep junitxml & co. lean

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """xdist: merge header entries that worker fixtures wrote."""
        raw = getattr(node, "workeroutput", {}).get(WORKER_HEADER)
        if raw:
            merge_header(self.worker_header, decode(json.loads(raw)))

    def header(self, exitstatus: int) -> dict[str, Any]:
        """Run header: options, evaluation and calibration text (and hashes), versions, host, git
        commit, timings + fixture entries (``data``: the data manifest per model)."""
        from esa.util.files import file_sha256
        from esa.util.runtime import run_environment

        o = self.options
        calib = o.calib_data if isinstance(o.calib_data, Path) else None
        head = {
            "models": list(o.models),
            "metrics": list(o.metrics),
            "tier": o.tier.to_dict(),
            "device": o.device,
            "eval_data": str(o.data) if o.data else "built-in corpus",
            "data_sha256": file_sha256(o.data) if o.data else None,
            "calib_data": o.calib_label,
            "calib_data_sha256": file_sha256(calib) if calib else None,
            **run_environment(self.config.rootpath),
            "args": " ".join(self.config.invocation_params.args),
            "started": datetime.fromtimestamp(self.start, timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.start, 2),
            "exit_status": int(exitstatus),
        }
        written: dict[str, Any] = self.config.stash[HEADER_KEY]  # by fixtures in this process
        return plain(merge_header(merge_header(head, self.worker_header), written))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, exitstatus: int) -> None:
        """Write claims.json/.md/.html once, when there are claims and reports are on."""
        if not self.claims or self.options.report_dir is None:
            return
        from esa.claims.report import compare_claims, write_reports

        claims = sorted(self.claims.values(), key=lambda c: c["id"])
        header = self.header(exitstatus)
        if self.options.compare is not None:
            claims, header["compare"] = compare_claims(claims, self.options.compare)
            self.claims = {c["id"]: c for c in claims}
        try:
            self.paths = write_reports(claims, header, self.options.report_dir)
        except OSError as e:
            self.error = f"esa: could not write the report to {self.options.report_dir}: {e}"

    def pytest_terminal_summary(self, terminalreporter) -> None:
        """One line per claim (verdict, id, key value), the counts, then the report paths."""
        if not self.claims:
            return
        tr = terminalreporter
        tr.write_sep("=", "esa claims")
        claims = sorted(self.claims.values(), key=lambda c: c["id"])
        width = max(len(c["verdict"]) for c in claims)
        for c in claims:
            name, value = key_measure(c)
            tr.write(c["verdict"].upper().ljust(width + 2), **MARKUP.get(c["verdict"], {}))
            tail = f"  {name}={fmt(value)}" if name else ""
            status = (c.get("compare") or {}).get("status")
            if status and status != "same":
                was = c["compare"]["previous"]
                tail += f"  [{status}, was {was}]" if was else f"  [{status}]"
            tr.write_line(f"{c['id']}{tail}")
        counts = count_verdicts(claims)
        tr.write_line(", ".join(f"{n} {v}" for v, n in counts.items() if n))
        if self.paths:
            tr.write_line("esa report: " + "  ".join(str(p) for p in self.paths.values()))
        if self.error:
            tr.write_line(self.error, red=True)
