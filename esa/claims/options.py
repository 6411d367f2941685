"""The esa pytest options: the flag/ini table, their defaults and ``EsaOptions`` (resolved once
per config, CLI over ini over defaults, and kept in ``config.stash[OPTIONS_KEY]``).

Registries are the source of truth: ``--esa-tier`` choices come from ``esa.claims.tiers.TIERS``,
``--esa-metric`` names are checked against ``esa.metrics.METRICS`` (imported only when metrics are
given, so the plugin stays cheap to import). The default texts come from the data layer
(``esa.data.default_data_file``: WikiText-2 test for evaluation, validation for calibration,
next to the repository), imported only when no text is given.
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
DEFAULT_REPORT = "reports"  # relative to rootdir; the default report goes to reports/<tier>/
DEFAULT_RECORDED = "experiments/recorded"  # relative to rootdir
NO_DATA = ("builtin", "none")  # --esa-data values that select the built-in corpus
BUILTIN = "builtin"
BOS_MODES = ("auto", "always", "never")  # esa.data.BOS_MODES (not imported: it needs torch)

# (flag, dest = ini name, argparse action or None for ini-only, help)
OPTIONS: list[tuple[str | None, str, str | None, str]] = [
    ("--esa-model", "esa_models", "append", f"model to run claims on (repeatable; default {DEFAULT_MODEL})"),
    ("--esa-metric", "esa_metrics", "append", f"sensitivity metric (repeatable; default {DEFAULT_METRIC})"),
    ("--esa-tier", "esa_tier", "store", f"compute tier: {', '.join(TIERS)} (default {DEFAULT_TIER})"),
    ("--esa-device", "esa_device", "store", "cpu, cuda, cuda:N or auto (default)"),
    (
        "--esa-report",
        "esa_report",
        "store",
        f"report directory (default: {DEFAULT_REPORT}/<tier> under rootdir)",
    ),
    ("--esa-data", "esa_data", "store", "evaluation text; 'builtin' for the built-in corpus"),
    (
        "--esa-calib-data",
        "esa_calib_data",
        "store",
        "calibration text (default: WikiText-2 validation when present); 'builtin' for the built-in corpus",
    ),
    ("--esa-bos", "esa_bos", "store", "windows start with BOS: auto (as the tokenizer does), always, never"),
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
    calib_data: Path | str | None  # a file, "builtin", or None = the data layer's fallback
    report_dir: Path | None  # None = --esa-no-report
    compare: Path | None
    recorded_dir: Path
    bos: str = "auto"  # esa.data.bos_policy mode: what every window starts with

    @property
    def calib_spec(self) -> str | None:
        """What the workbench gets as ``calib_data`` (None: the data layer takes the windows after
        the evaluation ones, as it does when the calibration text is the evaluation text)."""
        return None if self.calib_data is None else str(self.calib_data)

    @property
    def calib_label(self) -> str:
        """The calibration text in words (header line and report)."""
        if self.calib_data is None:
            return "windows after the evaluation windows (no calibration text given)"
        return "built-in corpus" if self.calib_data == BUILTIN else str(self.calib_data)


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


def default_data(split: str, root: Path) -> Path | None:
    """The data layer's default text for `split` ("test" or "validation") next to `root`, or None."""
    from esa.data import default_data_file

    found = default_data_file(split, root)
    return None if found is None else Path(found).resolve()


def _data(config: pytest.Config, name: str = "esa_data", split: str = "test") -> Path | None:
    """--esa-data / --esa-calib-data (relative to the working directory) over ini (relative to
    rootdir) over `default_data` for `split` when present; None selects the built-in corpus (or,
    for calibration without a default, the data layer's fallback)."""
    given = config.getoption(name)
    raw, base = (given, config.invocation_params.dir) if given else (config.getini(name), config.rootpath)
    if raw and raw.lower() not in NO_DATA:
        data = _path(raw, base)
        if not data.is_file():
            raise pytest.UsageError(f"--{name.replace('_', '-')} {raw}: no such file")
        return data
    return default_data(split, config.rootpath) if not raw else None


def _calib_data(config: pytest.Config) -> Path | str | None:
    """The calibration text: a file, `BUILTIN` when 'builtin' is given, else the default or None."""
    raw = config.getoption("esa_calib_data") or config.getini("esa_calib_data")
    if raw and raw.lower() in NO_DATA:
        return BUILTIN
    return _data(config, "esa_calib_data", "validation")


def _report_dir(config: pytest.Config, tier: Tier) -> Path:
    """--esa-report (relative to the working directory) over ini (relative to rootdir) over
    reports/<tier> under rootdir (one report per tier: runs at different tiers never clobber)."""
    given = config.getoption("esa_report")
    if given:
        return _path(given, config.invocation_params.dir)
    return _path(config.getini("esa_report") or f"{DEFAULT_REPORT}/{tier.name}", config.rootpath)


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
    data, calib = _data(config), _calib_data(config)
    report = None if opt("esa_no_report") else _report_dir(config, tier)
    compare = _path(opt("esa_compare"), cwd) if opt("esa_compare") else None
    bos = opt("esa_bos") or ini("esa_bos") or "auto"
    if bos not in BOS_MODES:
        raise pytest.UsageError(f"--esa-bos {bos}: use one of {', '.join(BOS_MODES)}")
    if compare is not None and not compare.is_file():
        raise pytest.UsageError(f"--esa-compare {opt('esa_compare')}: no such file")
    return EsaOptions(
        models=tuple(opt("esa_models") or ini("esa_models") or [DEFAULT_MODEL]),
        metrics=given_metrics or (DEFAULT_METRIC,),
        tier=tier,
        device=opt("esa_device") or ini("esa_device") or "auto",
        data=data,
        calib_data=calib,
        report_dir=report,
        compare=compare,
        recorded_dir=_path(ini("esa_recorded") or DEFAULT_RECORDED, root),
        bos=bos,
    )
