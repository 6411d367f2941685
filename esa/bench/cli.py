"""The command line of ``python -m esa.bench``: parse, run the chosen sections, print the tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from esa.bench.harness import (
    EVAL_ARCHS,
    RUNBOOK_HESSIAN_TENSORS,
    RUNBOOK_METRICS,
    SECTION_S,
    SECTIONS,
    run_sections,
)
from esa.bench.markdown import markdown
from esa.bench.sections import RUNNERS

DESCRIPTION = "Speed and memory benchmark: plain transformers vs esa's own code paths, side by side."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esa.bench", description=DESCRIPTION)
    p.add_argument(
        "--sections",
        default="env,eval,score,accuracy,hutchinson,hessian,select,perturb",
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all single-GPU but runbook)",
    )
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<date>-<host>.json)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-archs", default=",".join(EVAL_ARCHS))
    p.add_argument("--eval-windows", type=int, default=64, help="windows per timed eval (x2 at 1.4B)")
    p.add_argument("--score-archs", default="pythia-1.4b,llama-3.1-8b")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--score-limit-gb", type=float, default=40.0, help="the capped fp32 variant at 7-8B")
    p.add_argument("--score-only", default="", help="comma-separated substrings of the variants to run")
    p.add_argument("--accuracy-arch", default="pythia-1.4b")
    p.add_argument("--accuracy-windows", type=int, default=128)
    p.add_argument("--hutchinson-archs", default="pythia-1.4b,llama-3.1-8b")
    p.add_argument("--hutchinson-windows", type=int, default=4)
    p.add_argument("--hutchinson-limit-gb", type=float, default=80.0, help="device cap of curvature runs")
    p.add_argument("--hessian-archs", default="pythia-1.4b,llama-3.1-8b")
    p.add_argument("--select-arch", default="llama-3.1-8b")
    p.add_argument("--runbook-arch", default="llama-3.1-8b")
    p.add_argument("--runbook-windows", type=int, default=200)
    p.add_argument("--runbook-calib", type=int, default=128)
    p.add_argument("--runbook-metrics", default=",".join(RUNBOOK_METRICS))
    p.add_argument("--runbook-topk", type=int, default=100)
    p.add_argument("--runbook-modes", default="per_layer,global", help="one runbook run per mode")
    p.add_argument("--runbook-curvature-calib", type=int, default=1, help="curvature windows per seed")
    p.add_argument("--runbook-hutchinson-samples", type=int, default=8)
    p.add_argument(
        "--runbook-hessian-tensors",
        default=RUNBOOK_HESSIAN_TENSORS,
        help="regex: the tensors of hessian_diag",
    )
    p.add_argument("--runbook-no-compile", dest="runbook_compile", action="store_false", default=None)
    p.add_argument("--runbook-score-dtype", default="fp32")
    p.add_argument("--multi-arch", default="mixtral-8x7b")
    p.add_argument("--multi-windows", type=int, default=32)
    p.add_argument("--multi-calib", type=int, default=16)
    p.add_argument("--multi-min-gpus", type=int, default=2, help="GPUs the multi section needs")
    p.add_argument(
        "--multi-scores", default="act_mag:bf16,act_mag:fp32,grad_x_weight:bf16,grad_x_weight:fp32"
    )
    p.add_argument(
        "--section-budgets",
        default="",
        help="per-section seconds, e.g. eval=200,score=90 (defaults in SECTION_S)",
    )
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--report",
        nargs="*",
        default=None,
        metavar="JSON",
        help="print the markdown tables of existing results and exit",
    )
    return p


def _complete(args: argparse.Namespace) -> None:
    """Lists from the comma-separated options, per-section budgets, default device and output."""
    lists = (
        "eval_archs",
        "score_archs",
        "hutchinson_archs",
        "hessian_archs",
        "runbook_metrics",
        "runbook_modes",
    )
    for name in lists:
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    args.section_s = dict(SECTION_S)
    for part in filter(None, args.section_budgets.split(",")):
        key, _, value = part.partition("=")
        args.section_s[key.strip()] = float(value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("bench", "results", f"{stamp}-{platform.node() or 'host'}.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--report``, print the tables of existing results); exit code."""
    args = build_parser().parse_args(argv)
    if args.report is not None:
        for path in args.report:
            with open(path) as fh:
                print(markdown(json.load(fh)))
        return 0
    _complete(args)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"esa.bench: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    bench = run_sections(args, sections, RUNNERS)
    print(markdown(bench.results))
    print(f"[bench] wrote {args.out} ({time.time() - bench.start:.0f} s)")
    return 0
