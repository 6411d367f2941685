"""The esa pytest options: the flag/ini table, their defaults and ``EsaOptions`` (resolved once
per config, CLI over ini over defaults, and kept in ``config.stash[OPTIONS_KEY]``).

Registries are the source of truth: ``--esa-tier`` choices come from ``esa.claims.tiers.TIERS``,
``--esa-metric`` names are checked against ``esa.metrics.METRICS`` (imported only when metrics are
given, so the plugin stays cheap to import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from esa.claims.tiers import DEFAULT_TIER, TIERS, Tier, get_tier
from esa.errors import EsaError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METRIC = "grad_x_weight"
DEFAULT_DATA = Path("..", "shared", "data", "wikitext-2-raw", "wiki.test.raw")
"""WikiText-2 (raw) test split, relative to pytest's rootdir: the evaluation and calibration text
when neither ``--esa-data`` nor ini ``esa_data`` is given and the file exists; else the built-in
corpus (``esa.data`` has no default path of its own: there ``None`` means the built-in corpus)."""
DEFAULT_REPORT = "reports"  # relative to rootdir
DEFAULT_RECORDED = "experiments/recorded"  # relative to rootdir
NO_DATA = ("builtin", "none")  # --esa-data values that select the built-in corpus

# (flag, dest = ini name, argparse action or None for ini-only, help)
OPTIONS: list[tuple[str | None, str, str | None, str]] = [
    ("--esa-model", "esa_models", "append", f"model to run claims on (repeatable; default {DEFAULT_MODEL})"),
    ("--esa-metric", "esa_metrics", "append", f"sensitivity metric (repeatable; default {DEFAULT_METRIC})"),
    ("--esa-tier", "esa_tier", "store", f"compute tier: {', '.join(TIERS)} (default {DEFAULT_TIER})"),
    ("--esa-device", "esa_device", "store", "cpu, cuda, cuda:N or auto (default)"),
    ("--esa-report", "esa_report", "store", f"report directory (default: {DEFAULT_REPORT} under rootdir)"),
    ("--esa-data", "esa_data", "store", "evaluation/calibration text; 'builtin' for the built-in corpus"),
    ("--esa-compare", "esa_compare", "store", "older claims.json to diff the verdicts against"),
    ("--esa-no-report", "esa_no_report", "store_true", "write no claims report"),
    (None, "esa_recorded", None, f"recorded-outcomes directory (default {DEFAULT_RECORDED})"),
]
CLI_ONLY = ("esa_compare", "esa_no_report")  # no ini counterpart (ini paths are relative to rootdir)


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
HEADER_KEY = pytest.StashKey[dict[str, Any]]()  # extra report-header entries written by fixtures


def add_options(parser: pytest.Parser) -> None:
    """Register the ``--esa-*`` flags and their ini counterparts."""
    group = parser.getgroup("esa", "esa claims (super-weight experiments)")
    for flag, dest, action, text in OPTIONS:
        if flag:
            extra: dict[str, Any] = {"choices": sorted(TIERS)} if dest == "esa_tier" else {}
            if action != "store_true":
                extra["metavar"] = dest[4:].rstrip("s").upper()  # MODEL, METRIC, DATA, ...
            group.addoption(flag, dest=dest, action=action, help=text, **extra)
        if dest not in CLI_ONLY:
            kind: Literal["linelist", "string"] = "linelist" if action == "append" else "string"
            parser.addini(dest, help=f"esa: {text}", type=kind, default=[] if kind == "linelist" else "")


def _path(value: str, base: Path) -> Path:
    return (base / os.path.expanduser(value)).resolve()


def check_metrics(metrics: tuple[str, ...]) -> None:
    """UsageError naming the registered metrics unless every name is in ``esa.metrics.METRICS``."""
    from esa.metrics import METRICS

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise pytest.UsageError(f"--esa-metric {unknown[0]}: unknown metric; use one of {', '.join(METRICS)}")


def _data(config: pytest.Config) -> Path | None:
    """--esa-data (relative to the working directory) over ini (relative to rootdir) over
    `DEFAULT_DATA` when present; None selects the built-in corpus."""
    given = config.getoption("esa_data")
    raw, base = (
        (given, config.invocation_params.dir) if given else (config.getini("esa_data"), config.rootpath)
    )
    if raw and raw.lower() not in NO_DATA:
        data = _path(raw, base)
        if not data.is_file():
            raise pytest.UsageError(f"--esa-data {raw}: no such file")
        return data
    default = (config.rootpath / DEFAULT_DATA).resolve()
    return default if not raw and default.is_file() else None


def _report_dir(config: pytest.Config) -> Path:
    """--esa-report (relative to the working directory) over ini (relative to rootdir)."""
    given = config.getoption("esa_report")
    if given:
        return _path(given, config.invocation_params.dir)
    return _path(config.getini("esa_report") or DEFAULT_REPORT, config.rootpath)


def resolve_options(config: pytest.Config) -> EsaOptions:
    """The session's `EsaOptions`; bad values raise ``pytest.UsageError`` (one line, exit 4)."""
    opt, ini, root, cwd = config.getoption, config.getini, config.rootpath, config.invocation_params.dir
    try:
        tier = get_tier(opt("esa_tier") or ini("esa_tier") or DEFAULT_TIER)
    except EsaError as e:
        raise pytest.UsageError(str(e)) from None
    given_metrics = tuple(opt("esa_metrics") or ini("esa_metrics") or ())
    if given_metrics:
        check_metrics(given_metrics)
    data = _data(config)
    report = None if opt("esa_no_report") else _report_dir(config)
    compare = _path(opt("esa_compare"), cwd) if opt("esa_compare") else None
    if compare is not None and not compare.is_file():
        raise pytest.UsageError(f"--esa-compare {opt('esa_compare')}: no such file")
    return EsaOptions(
        models=tuple(opt("esa_models") or ini("esa_models") or [DEFAULT_MODEL]),
        metrics=given_metrics or (DEFAULT_METRIC,),
        tier=tier,
        device=opt("esa_device") or ini("esa_device") or "auto",
        data=data,
        report_dir=report,
        compare=compare,
        recorded_dir=_path(ini("esa_recorded") or DEFAULT_RECORDED, root),
    )
