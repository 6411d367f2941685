"""``esa report``: paper tools from what a run left behind.

- From a ``claims.json`` (``pytest experiments``): the report again (claims.html, claims.md,
  claims.json), the LaTeX tables (``claims_tables.tex``, booktabs: the claims × models matrix
  and the ΔPPL table) and the claim figures as PNG/PDF/SVG files (``figures/``), optionally
  compared with an older claims.json.
- From an ``esa run`` out-dir (or its results.json): the ΔPPL table as LaTeX (``delta_ppl.tex``);
  the run's figures already have PDF/SVG copies next to their PNGs (``--save-plots``).

`add_parser` adds the subcommand to the ``esa`` parser, `main` runs it (exit code 0; bad input
raises `esa.errors.ConfigError`, a one-line message naming the fix).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esa.claims.report import load_claims, write_reports
from esa.claims.report_latex import delta_ppl_latex, latex_document
from esa.claims.report_tables import run_delta_ppl_rows
from esa.errors import ConfigError
from esa.util.files import atomic_write

HELP = "claims report, LaTeX tables and figures from a claims.json; ΔPPL LaTeX table of an esa run"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to the ``esa`` subcommands (`subparsers` from ``add_subparsers``)."""
    p = subparsers.add_parser("report", help=HELP, description=HELP)
    p.add_argument("source", help="a claims.json written by pytest experiments, or an esa run out-dir")
    p.add_argument("--out-dir", default=None, help="where to write (default: the source's folder)")
    p.add_argument(
        "--compare", default=None, metavar="OLD", help="an older claims.json: changed verdicts and values"
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="LaTeX as a document that compiles on its own (default: tables to \\input into a paper)",
    )
    return p


def _read(
    path: Path, what: str = "a claims.json written by pytest experiments, or an esa run out-dir"
) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): pass {what}") from None


def _source(source: Path) -> tuple[str, Path]:
    """("claims" | "run", the file to read) for a claims.json, a results.json or a folder."""
    if source.is_dir():
        for name, kind in (("claims.json", "claims"), ("results.json", "run")):
            if (source / name).is_file():
                return kind, source / name
        raise ConfigError(
            f"{source} holds neither claims.json nor results.json: pass a report or an esa run out-dir"
        )
    if source.name == "results.json":
        return "run", source
    return "claims", source


def _finish(tex: Path, standalone: bool) -> None:
    if standalone:
        atomic_write(tex, latex_document(tex.read_text(encoding="utf-8")))


def main(args: argparse.Namespace) -> int:
    """Write the report files (see the module docstring) and print their paths."""
    kind, path = _source(Path(args.source))
    out = Path(args.out_dir) if args.out_dir else path.parent
    if kind == "run":
        results = _read(path, "the results.json of a finished esa run")
        manifest = path.parent / "experiment_manifest.json"
        model = (_read(manifest, "the run's manifest").get("model") or {}) if manifest.is_file() else {}
        rows = run_delta_ppl_rows(results, str(model.get("name", "")))
        if not rows:
            raise ConfigError(f"{path} has no ΔPPL summary: pass the results.json of a finished esa run")
        out.mkdir(parents=True, exist_ok=True)
        tex = out / "delta_ppl.tex"
        atomic_write(tex, delta_ppl_latex(rows) + "\n")
        _finish(tex, args.standalone)
        print(f"esa report: {tex}")
        return 0
    _read(path)  # a readable error before decoding
    try:
        doc = load_claims(path)
        claims, header = doc["claims"], doc["header"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a claims report (missing {exc}): pass the claims.json of pytest experiments"
        ) from None
    if args.compare is not None:  # a new comparison replaces the one the report may hold
        if not Path(args.compare).is_file():
            raise ConfigError(f"--compare {args.compare}: no such file; pass an older claims.json")
        header = {k: v for k, v in header.items() if k != "compare"}
        claims = [{k: v for k, v in c.items() if k != "compare"} for c in claims]
    paths = write_reports(claims, header, out, compare=args.compare)
    _finish(paths["tex"], args.standalone)
    figures = [out / "figures"] if (out / "figures").is_dir() else []
    print("esa report: " + "  ".join(str(p) for p in [*paths.values(), *figures]))
    return 0
