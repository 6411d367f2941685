"""pytest plugin for esa claims: options, markers, the `claim` fixture and one report per session.

Loaded through the ``pytest11`` entry point ``esa``; with PYTEST_DISABLE_PLUGIN_AUTOLOAD use
``-p esa`` (never ``-p esa.claims.plugin`` or ``pytest_plugins = ["esa.claims.plugin"]``: next to the entry point
that registers the module twice and pytest refuses).

A claim is a test that requests the ``claim`` fixture; its verdict is the test outcome: pass =
holds, failed check/assert = falsified, any other exception (setup, call or teardown) = error,
xfail = falsified (recorded), xpass = changed, skip = skipped.

Recorded outcomes: ``<rootdir>/experiments/recorded/<model>.json`` (ini ``esa_recorded``) holds a
list of ``{"claim_id", "measured", "date", "note"}``; claim_id is the nodeid relative to rootdir.
An item matches when its nodeid equals a claim_id in the file of its ``model`` parameter (or, for
items without one, of any ``--esa-model``); it is then marked ``xfail(strict=True)``.

Workers attach records to ``report.user_properties``; only the controller writes the reports.
State lives in ``config.stash`` and a per-config ``ClaimsSession`` object, never module globals,
so in-process pytester runs do not leak into each other.
"""

from __future__ import annotations

import base64
import json
import operator
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from esa.claims.report import (
    CHANGED,
    ERROR,
    FALSIFIED,
    HOLDS,
    RECORDED,
    SKIPPED,
    count_verdicts,
    fmt,
    key_measure,
    load_recorded,
    phase_of,
    record_outcome,
)
from esa.claims.tiers import TIERS, Tier, get_tier
from esa.errors import EsaError
from esa.util.files import file_sha256
from esa.util.serialize import decode, dumps, plain

__all__ = [
    "HEADER_KEY",
    "OPTIONS_KEY",
    "Claim",
    "ClaimsSession",
    "EsaOptions",
    "item_models",
    "load_recorded",
    "record_outcome",
]
PROPERTY = "esa_claim"  # user_properties name carrying one JSON claim record
MARKERS = {
    **{f"phase{i}": f"claims of phase {i} of the esa runbook" for i in range(1, 6)},
    "smoke": "cheap claims that run at the smoke tier",
    "gpu": "needs CUDA; skipped when torch.cuda.is_available() is False",
    "slow": "minutes or more even at the smoke tier",
    "claim": "added to every test that states a claim (uses the claim fixture)",
}
_SKIP_MARKERS = {"parametrize", "usefixtures", "filterwarnings", "xfail", "skip", "skipif", "xdist_group"}
_OPS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class EsaOptions:
    """Resolved esa options (CLI over ini over defaults); relative paths already resolved."""

    models: tuple[str, ...]
    metrics: tuple[str, ...]
    tier: Tier
    device: str
    data: Path | None  # None = the built-in corpus
    report_dir: Path | None  # None = --esa-no-report
    compare: Path | None
    recorded_dir: Path


OPTIONS_KEY = pytest.StashKey[EsaOptions]()
HEADER_KEY = pytest.StashKey[dict]()  # extra report-header entries written by fixtures
_CLAIM_KEY = pytest.StashKey["Claim"]()
_RECORDED_KEY = pytest.StashKey[dict]()


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
        self._phases: dict[str, tuple] = {}

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
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}: use one of {' '.join(_OPS)}")
        threshold = self.threshold if threshold is None else plain(threshold)
        value = plain(value)
        if name is not None:
            self.measure(name, value)
        try:
            ok = bool(_OPS[op](value, threshold))
        except TypeError:
            ok = False
        text = f"{name or 'value'} = {_num(value)} {op} {_num(threshold)}"
        return self.check(ok, text if ok else f"{text} does not hold")

    def _observe(self, call: pytest.CallInfo, report: pytest.TestReport) -> None:
        """Turn one phase report into (verdict, outcome, message, duration)."""
        when, xf = report.when, hasattr(report, "wasxfail")
        exc, msg = call.excinfo, report.longrepr if isinstance(report.longrepr, str) else ""
        if exc is not None:  # pytest.fail/skip/xfail: their message; anything else: "Type: message"
            outcome_exc = isinstance(exc.value, (pytest.fail.Exception, pytest.skip.Exception))
            msg = str(exc.value) if outcome_exc else f"{exc.typename}: {exc.value}"
        if report.failed and when != "call":
            verdict, outcome = ERROR, "error"
        elif report.failed:  # no exception: strict XPASS; only a failed check/assert falsifies
            verdict, outcome = (
                (CHANGED, "xpassed")
                if exc is None
                else (
                    FALSIFIED if exc.errisinstance((AssertionError, pytest.fail.Exception)) else ERROR,
                    "failed",
                )
            )
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
        markers = list(dict.fromkeys(m.name for m in item.iter_markers() if m.name not in _SKIP_MARKERS))
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
                "recorded": item.stash.get(_RECORDED_KEY, None),
                "verdict": verdict,
                "outcome": outcome,
                "message": msg,
                "duration": round(sum(p[3] for p in ph.values()), 4),
            }
        )


def _claim_for(item: pytest.Item) -> Claim:
    if _CLAIM_KEY not in item.stash:
        doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
        item.stash[_CLAIM_KEY] = Claim(doc.splitlines()[0] if doc else item.name)
    return item.stash[_CLAIM_KEY]


@pytest.fixture
def claim(request: pytest.FixtureRequest) -> Claim:
    """This test's `Claim`: ``claim("statement", threshold=..., key=...)``, ``claim.measure(...)``."""
    return _claim_for(request.node)


@pytest.fixture(scope="session")
def esa_options(pytestconfig: pytest.Config) -> EsaOptions:
    """The resolved esa options (models, metrics, tier, device, data, ...)."""
    return pytestconfig.stash[OPTIONS_KEY]


@pytest.fixture(scope="session")
def esa_bench(pytestconfig: pytest.Config):
    """The session's :class:`esa.workbench.Workbench`: models loaded once, measurements memoized."""
    from esa.claims.workbench import Workbench

    o = pytestconfig.stash[OPTIONS_KEY]
    device = None if o.device == "auto" else o.device
    return Workbench(o.tier, device=device, data=str(o.data) if o.data else None)


@pytest.fixture(scope="session")
def esa_header(pytestconfig: pytest.Config) -> dict:
    """Mutable dict merged into the report header (e.g. ``esa_header["windows_sha256"] = h``)."""
    return pytestconfig.stash[HEADER_KEY]


# -- recorded outcomes -------------------------------------------------------------------------


def _same_setup(entry: dict, options: EsaOptions, cache: dict) -> bool:
    """A recorded outcome applies only at the tier and on the data it was measured with."""
    if entry.get("tier", options.tier.name) != options.tier.name:
        return False
    if "data_sha256" in entry:
        if "__data_sha256__" not in cache:
            cache["__data_sha256__"] = file_sha256(options.data) if options.data else None
        return entry["data_sha256"] == cache["__data_sha256__"]
    return True


def claim_id(item: pytest.Item) -> str:
    """The item's nodeid without the ``@group`` suffix that xdist's --dist loadgroup appends."""
    marker = item.get_closest_marker("xdist_group")
    group = (marker.kwargs.get("name") or (marker.args[0] if marker.args else None)) if marker else None
    suffix = f"@{group}" if group else None
    return item.nodeid[: -len(suffix)] if suffix and item.nodeid.endswith(suffix) else item.nodeid


MODEL_PARAMS = ("model", "profiled", "arch")  # parameters whose value names the model under test


def item_models(item: pytest.Item, options: EsaOptions) -> tuple[str, ...]:
    """Models whose recorded file may hold this item: its model parameter (``model``, ``profiled``
    or ``arch``), else every --esa-model (session-level claims over several models)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name in MODEL_PARAMS:
        if name in params:
            return (str(params[name]),)
    return options.models


# -- options and configuration -----------------------------------------------------------------

_OPTIONS = [  # (flag, dest = ini name, argparse action or None for ini-only, help)
    ("--esa-model", "esa_models", "append", "model to run claims on (repeatable; default smollm2-135m)"),
    ("--esa-metric", "esa_metrics", "append", "sensitivity metric (repeatable; default grad_x_weight)"),
    ("--esa-tier", "esa_tier", "store", "compute tier: smoke (default), standard or extended"),
    ("--esa-device", "esa_device", "store", "cpu, cuda, cuda:N or auto (default)"),
    ("--esa-report", "esa_report", "store", "report directory (default: reports under rootdir)"),
    ("--esa-data", "esa_data", "store", "evaluation/calibration text; 'builtin' for the built-in corpus"),
    ("--esa-compare", "esa_compare", "store", "older claims.json to diff the verdicts against"),
    ("--esa-no-report", "esa_no_report", "store_true", "write no claims report"),
    (None, "esa_recorded", None, "recorded-outcomes directory (default experiments/recorded)"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("esa", "esa claims (super-weight experiments)")
    for flag, dest, action, text in _OPTIONS:
        if flag:
            extra = {"choices": sorted(TIERS)} if dest == "esa_tier" else {}
            if action != "store_true":
                extra["metavar"] = dest[4:].rstrip("s").upper()  # MODEL, METRIC, DATA, ...
            group.addoption(flag, dest=dest, action=action, help=text, **extra)
        if dest not in ("esa_compare", "esa_no_report"):  # ini paths are relative to rootdir
            kind = "linelist" if action == "append" else "string"
            parser.addini(dest, help=f"esa: {text}", type=kind, default=[] if kind == "linelist" else "")


def _path(value: str, base: Path) -> Path:
    return (base / os.path.expanduser(value)).resolve()


def _resolve_options(config: pytest.Config) -> EsaOptions:
    opt, ini, root = config.getoption, config.getini, config.rootpath
    cwd = config.invocation_params.dir
    try:
        tier = get_tier(opt("esa_tier") or ini("esa_tier") or "smoke")
    except EsaError as e:
        raise pytest.UsageError(str(e)) from None
    data_opt = opt("esa_data")
    data_raw, base = (data_opt, cwd) if data_opt else (ini("esa_data"), root)
    if data_raw and data_raw.lower() not in ("builtin", "none"):
        data = _path(data_raw, base)
        if not data.is_file():
            raise pytest.UsageError(f"--esa-data {data_raw}: no such file")
    else:
        default = (root.parent / "shared/data/wikitext-2-raw/wiki.test.raw").resolve()
        data = default if not data_raw and default.is_file() else None
    rep_opt = opt("esa_report")
    report = (
        None
        if opt("esa_no_report")
        else (_path(rep_opt, cwd) if rep_opt else _path(ini("esa_report") or "reports", root))
    )
    compare = _path(opt("esa_compare"), cwd) if opt("esa_compare") else None
    if compare is not None and not compare.is_file():
        raise pytest.UsageError(f"--esa-compare {opt('esa_compare')}: no such file")
    return EsaOptions(
        models=tuple(opt("esa_models") or ini("esa_models") or ["smollm2-135m"]),
        metrics=tuple(opt("esa_metrics") or ini("esa_metrics") or ["grad_x_weight"]),
        tier=tier,
        device=opt("esa_device") or ini("esa_device") or "auto",
        data=data,
        report_dir=report,
        compare=compare,
        recorded_dir=_path(ini("esa_recorded") or "experiments/recorded", root),
    )


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[OPTIONS_KEY] = _resolve_options(config)
    config.stash[HEADER_KEY] = {}
    if _is_controller(config):
        config.pluginmanager.register(ClaimsSession(config), "esa-claims-session")
    else:
        _share_cpu_threads(config)


def _share_cpu_threads(config: pytest.Config) -> None:
    """On an xdist worker, give torch its share of the CPU cores (oversubscribed intra-op
    threads slow small models down many times over)."""
    workers = int(config.workerinput.get("workercount", 1))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_report_header(config: pytest.Config) -> str:
    o = config.stash[OPTIONS_KEY]
    return (
        f"esa: models={','.join(o.models)} metrics={','.join(o.metrics)} tier={o.tier.name} "
        f"device={o.device} data={o.data or 'built-in corpus'}"
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselection, so `-m "not claim"` sees the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` items without CUDA; mark recorded falsified claims xfail(strict=True)."""
    options, cache, cuda = config.stash[OPTIONS_KEY], {}, None
    for item in items:
        if "claim" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.claim)
            models = item_models(item, options)
            if config.pluginmanager.hasplugin("xdist"):
                # with --dist loadgroup, a model's claims of one file share a worker (one load each)
                item.add_marker(pytest.mark.xdist_group(f"{models[0]}-{item.path.stem}"))
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False"))
        for model in item_models(item, options):
            if model not in cache:
                try:
                    cache[model] = load_recorded(options.recorded_dir / f"{model}.json")
                except EsaError as e:
                    raise pytest.UsageError(str(e)) from None
            entry = cache[model].get(claim_id(item))
            if entry is not None and not _same_setup(entry, options, cache):
                entry = None  # recorded at another tier or on other data: verdicts may differ
            if entry is not None:
                item.stash[_RECORDED_KEY] = {"model": model, **entry}
                reason = (
                    f"recorded: falsified on {model} ({entry.get('date', '?')}): {fmt(entry.get('measured'))}"
                )
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
                break


# -- reporting hooks ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Shorten EsaError reports to their one-line message; attach claim records at teardown."""
    report = yield
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(EsaError):
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
    if "claim" in getattr(item, "fixturenames", ()):
        c = _claim_for(item)
        c._observe(call, report)
        if report.when == "teardown":
            report.user_properties.append((PROPERTY, dumps(c.record(item))))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Collection errors raised as EsaError (e.g. an unknown model) show as one line."""
    report = yield
    call = getattr(report, "call", None)
    if (
        report.failed
        and call is not None
        and call.excinfo is not None
        and call.excinfo.errisinstance(EsaError)
    ):
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist worker: send header entries written by fixtures to the controller."""
    config = session.config
    if not _is_controller(config):
        config.workeroutput["esa_header"] = dumps(config.stash[HEADER_KEY])


_MARKUP = {
    HOLDS: {"green": True},
    FALSIFIED: {"red": True, "bold": True},
    RECORDED: {"yellow": True},
    CHANGED: {"purple": True, "bold": True},
    ERROR: {"red": True},
    SKIPPED: {},
}


class ClaimsSession:
    """Controller-only: gathers claim records, writes the reports, prints the summary."""

    def __init__(self, config: pytest.Config):
        self.config, self.options, self.start = config, config.stash[OPTIONS_KEY], time.time()
        self.claims: dict[str, dict] = {}  # id -> record
        self.worker_header: dict = {}
        self.paths: dict[str, Path] = {}
        self.error: str | None = None

    def pytest_sessionstart(self) -> None:
        self.start = time.time()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Take claim records out of user_properties (one per test, on the teardown report)."""
        props = report.user_properties
        for value in [v for k, v in props if k == PROPERTY]:
            rec = decode(json.loads(value))
            self.claims[rec["id"]] = rec
        props[:] = [(k, v) for k, v in props if k != PROPERTY]  # keep junitxml & co. lean

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """xdist: merge header entries that worker fixtures wrote."""
        raw = getattr(node, "workeroutput", {}).get("esa_header")
        if raw:
            self.worker_header.update(decode(json.loads(raw)))

    def header(self, exitstatus) -> dict:
        """Run header: options, data hash, versions, host, git commit, timings + fixture entries."""
        from esa.util.files import file_sha256
        from esa.util.runtime import run_environment

        o = self.options
        head = {
            "models": list(o.models),
            "metrics": list(o.metrics),
            "tier": o.tier.to_dict(),
            "device": o.device,
            "data": str(o.data) if o.data else "built-in corpus",
            "data_sha256": file_sha256(o.data) if o.data else None,
            **run_environment(self.config.rootpath),
            "args": " ".join(self.config.invocation_params.args),
            "started": datetime.fromtimestamp(self.start, timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.start, 2),
            "exit_status": int(exitstatus),
        }
        return plain({**head, **self.worker_header, **self.config.stash[HEADER_KEY]})

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, exitstatus) -> None:
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
            tr.write(c["verdict"].upper().ljust(width + 2), **_MARKUP.get(c["verdict"], {}))
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
