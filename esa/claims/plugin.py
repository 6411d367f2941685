"""pytest plugin for esa claims: the hooks (options, markers, recorded-outcome marking, claim
verdicts, one report per session).

Loaded through the ``pytest11`` entry point ``esa``; with PYTEST_DISABLE_PLUGIN_AUTOLOAD use
``-p esa`` (never ``-p esa.claims.plugin`` or ``pytest_plugins = ["esa.claims.plugin"]``: next to
the entry point that registers the module twice and pytest refuses).

The parts, one concept each: ``options`` (``--esa-*`` flags, `EsaOptions`), ``claim`` (`Claim`
and its verdict), ``fixtures`` (``claim``, ``esa_options``, ``esa_workbench``, ``esa_header``;
registered in `pytest_configure`), ``recorded`` (recorded outcomes -> strict xfail),
``session`` (`ClaimsSession`: records from workers, reports at session end), ``report``
(claims.json/md/html), ``verdict`` (the call phase's verdict: holds, falsified, inconclusive,
error, falsified (recorded), changed).

State lives in ``config.stash`` and a per-config ``ClaimsSession`` object, never module globals,
so in-process pytester runs do not leak into each other. Cheap to import: no torch here.
"""

from __future__ import annotations

import os

import pytest

from esa.claims import fixtures
from esa.claims.claim import RECORDED_KEY, Claim, ClaimFalsified, ClaimInconclusive, claim_for
from esa.claims.options import HEADER_KEY, OPTIONS_KEY, EsaOptions, add_options, resolve_options
from esa.claims.recorded import RecordedOutcomes, item_models, load_recorded, record_outcome
from esa.claims.report import fmt
from esa.claims.session import PROPERTY, WORKER_HEADER, ClaimsSession, is_controller
from esa.claims.verdict import below_min_tier, check_min_tier, decide
from esa.errors import EsaError
from esa.util import memory
from esa.util.serialize import dumps

__all__ = [
    "HEADER_KEY",
    "OPTIONS_KEY",
    "Claim",
    "ClaimFalsified",
    "ClaimInconclusive",
    "ClaimsSession",
    "EsaOptions",
    "item_models",
    "load_recorded",
    "record_outcome",
]
MARKERS = {
    **{f"phase{i}": f"claims of phase {i} of the esa runbook" for i in range(1, 6)},
    "smoke": "cheap claims that run at the smoke tier",
    "gpu": "needs CUDA; skipped when torch.cuda.is_available() is False",
    "slow": "minutes or more even at the smoke tier",
    "claim": "added to every test that states a claim (uses the claim fixture)",
    "min_tier": "min_tier(tier, reason=...): below this tier the claim runs but is inconclusive",
    "shares": "shares(key): under --dist loadgroup the claim runs on the worker of its model, file "
    "and key: claims of one key reuse each other's measurements, other keys may run in parallel",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[OPTIONS_KEY] = resolve_options(config)
    config.stash[HEADER_KEY] = {}
    config.pluginmanager.register(fixtures, "esa-fixtures")
    if is_controller(config):
        config.pluginmanager.register(ClaimsSession(config), "esa-claims-session")
    else:
        _share_cpu_threads(config)


def _share_cpu_threads(config: pytest.Config) -> None:
    """On an xdist worker, give torch its share of the CPU cores (oversubscribed intra-op
    threads slow small models down many times over)."""
    workers = int(config.workerinput.get("workercount", 1))  # type: ignore[attr-defined]
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_report_header(config: pytest.Config) -> str:
    o = config.stash[OPTIONS_KEY]
    return (
        f"esa: models={','.join(o.models)} metrics={','.join(o.metrics)} tier={o.tier.name} "
        f"device={o.device} data={o.data or 'built-in corpus'} "
        f"calibration={o.calib_label}"
    )


def _is_claim(item: pytest.Item) -> bool:
    return "claim" in getattr(item, "fixturenames", ())


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def worker_group(item: pytest.Item, options: EsaOptions) -> str:
    """The xdist group of a claim: its model and file, and its ``shares`` key when it has one."""
    group = f"{item_models(item, options)[0]}-{item.path.stem}"
    share = item.get_closest_marker("shares")
    return group if share is None else f"{group}-{share.args[0]}"


@pytest.hookimpl(tryfirst=True)  # before -m deselection, so `-m "not claim"` sees the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark claims; check ``min_tier`` markers; skip `gpu` items without CUDA; mark recorded
    falsified claims ``xfail(strict=True, raises=ClaimFalsified)`` (not below their minimum tier,
    where they cannot be falsified)."""
    options = config.stash[OPTIONS_KEY]
    recorded, cuda = RecordedOutcomes(options), None
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        check_min_tier(item)
        if _is_claim(item):
            item.add_marker(pytest.mark.claim)
            if xdist:  # with --dist loadgroup, a model's claims of one file share a worker (one load each)
                item.add_marker(pytest.mark.xdist_group(worker_group(item, options)))
        if item.get_closest_marker("gpu"):
            cuda = _cuda_available() if cuda is None else cuda
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False"))
        try:
            entry = recorded.match(item)
        except EsaError as e:
            raise pytest.UsageError(str(e)) from None
        if entry is not None:
            item.stash[RECORDED_KEY] = entry
            if below_min_tier(item, options.tier) is None:
                when = entry.get("date", "?")
                reason = f"recorded: falsified on {entry['model']} ({when}): {fmt(entry.get('measured'))}"
                item.add_marker(pytest.mark.xfail(strict=True, raises=ClaimFalsified, reason=reason))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup``: the groups go out longest first, by the last report's durations
    (`esa.claims.schedule.LongestFirst`); other modes keep xdist's scheduler."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from esa.claims.schedule import LongestFirst, last_durations

    return LongestFirst(config, log, last_durations(config.stash[OPTIONS_KEY].report_dir))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A claim's peak memory over its call phase (resident set, and GPU where CUDA is in use;
    lazily loaded models and scores count where they are first used); then the heap it freed
    goes back to the OS."""
    if not _is_claim(item):
        return (yield)
    scope = memory.reset_peak()
    try:
        return (yield)
    finally:
        claim_for(item).peak_memory = memory.peak(scope)
        memory.trim_heap()  # what the claim freed leaves the resident set before the next one


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Shorten EsaError reports to their one-line message; decide a claim's verdict after its call
    (`esa.claims.verdict.decide`, which makes the report agree); attach its record at teardown."""
    report = yield
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(EsaError):
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"
    if _is_claim(item):
        c = claim_for(item)
        tier = item.config.stash[OPTIONS_KEY].tier
        c.observe(call, report, decide(item, call, report, tier) if report.when == "call" else None)
        if report.when == "teardown":
            report.user_properties.append((PROPERTY, dumps(c.record(item))))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Collection errors raised as EsaError (e.g. an unknown model) show as one line."""
    report = yield
    call = getattr(report, "call", None)
    exc = getattr(call, "excinfo", None)
    if report.failed and exc is not None and exc.errisinstance(EsaError):
        report.longrepr = f"{exc.typename}: {exc.value}"
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist worker: send header entries written by fixtures to the controller."""
    config = session.config
    if not is_controller(config):
        config.workeroutput[WORKER_HEADER] = dumps(config.stash[HEADER_KEY])  # type: ignore[attr-defined]
