"""The ``esa`` command line: ``esa run``, ``esa eval``, ``esa detect``, ``esa models``, ``esa metrics``.

Thin over the library. Bad input ends with a one-line ``esa: error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from esa import cli_cache
from esa.claims import report_cli
from esa.errors import EsaError


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _bit(text: str) -> int | str:
    """--perturb-bit: an integer index, else a position name (checked by the runbook)."""
    try:
        return int(text)
    except ValueError:
        return text.strip()


def _default_data(args, calib: bool) -> None:
    """Fill --data-file (and --calib-file) with the offline WikiText-2 test (validation) file
    under ../shared/data when the user gave none and it is present; else leave None (built-in
    corpus; windows after the evaluation ones)."""
    from esa.data import default_data_file

    if args.data_file is None:
        found = default_data_file("test")
        args.data_file = None if found is None else str(found)
    if calib and args.calib_file is None:
        found = default_data_file("validation")
        args.calib_file = None if found is None else str(found)


_MODEL_HELP = "registry name (esa models), hub id, local HF dir or .gguf"
_DATA_HELP = (
    "evaluation text: a text file, a parquet/arrow/jsonl/csv file with a text column, "
    "wikitext-2-raw-v1 (both via datasets) or builtin; default "
    "../shared/data/wikitext-2-raw/wiki.test.raw when present, else the built-in corpus"
)
_CALIB_HELP = (
    "calibration text; default ../shared/data/wikitext-2/valid.txt when present, else the windows "
    "after the evaluation ones (also what the evaluation text itself, or builtin with it, gives)"
)
_BOS_HELP = "start each window with the BOS token (input only, never scored): auto = as the tokenizer does"
_DTYPE_HELP = "default fp32 on CPU, bf16 on CUDA"
_DEVICE_HELP = "cpu, cuda, cuda:N (default: cuda if available)"
_OUT_HELP = (
    "where the artifacts go; default outputs/esa/<model>/<metric>_<mode>_k<topk>_<perturbation>, "
    "with -2, -3... appended rather than overwriting an earlier run (printed at the end)"
)
_FLAG = {"action": "store_true"}
_ADVANCED = "adaptive_noise magnitude_scaling quantization progressive"
_CURVATURE: list[tuple[tuple[str, ...], dict]] = [  # hutchinson_diag / hessian_diag (docs/CLI.md)
    (("--hutchinson-samples",), {"type": int, "default": 8, "help": "probes of hutchinson_diag (default 8)"}),
    (("--curvature-calib-samples",), {"type": int, "help": "windows per seed of the curvature metrics"}),
    (("--hessian-tensors",), {"metavar": "REGEX", "help": "tensors hessian_diag scores (re.search)"}),
    (("--memory-limit",), {"type": float, "metavar": "GIB", "help": "peak GiB the scoring passes plan for"}),
]
_OLD_RUNNER: list[tuple[tuple[str, ...], dict]] = [  # the old esa_runner.py's options (docs/CLI.md)
    (("--weight-analysis",), {**_FLAG, "help": "cluster the top-k weights; correlate the metrics' scores"}),
    (("--architecture-analysis",), {**_FLAG, "help": "top-k vs parameter shares per layer x component"}),
    (("--temporal-stability",), {**_FLAG, "help": "top-k Jaccard matrix across seeds/metrics/checkpoints"}),
    (
        ("--checkpoints",),
        {"type": _csv, "default": [], "help": "in training order: names, dirs, name@revision"},
    ),
    (("--advanced-perturbations",), {"nargs": "+", "default": [], "metavar": "M", "help": _ADVANCED}),
    (("--clustering-method",), {"default": "kmeans", "help": "kmeans (default) or dbscan"}),
    (("--n-clusters",), {"type": int, "default": 5, "help": "KMeans clusters (default 5)"}),
    (("--downstream-tasks",), {**_FLAG, "help": "zero-shot tasks on the baseline and each condition"}),
    (("--tasks",), {"type": _csv, "default": None, "help": "task names or JSONL files (see docs/CLI.md)"}),
    (("--task-samples",), {"type": int, "default": 100, "help": "examples per task (default 100)"}),
    (("--export-topk-csv",), {"action": "store_true", "default": True, "help": "top_weights.csv (always)"}),
    (("--export-stats",), {**_FLAG, "help": "per-tensor score statistics: score_stats.csv"}),
    (("--scale",), {"type": float, "default": None, "help": "magnitude_scaling (and scale) factor"}),
    (("--bits",), {"type": int, "default": None, "help": "quantization bit count (default 4)"}),
    (("--noise-sigma", "--noise_sigma"), {"type": float, "default": None, "help": "adaptive_noise factor"}),
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help=_MODEL_HELP)
    p.add_argument("--data-file", default=None, help=_DATA_HELP)
    p.add_argument("--calib-file", default=None, help=_CALIB_HELP)
    p.add_argument("--max-length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-samples", type=int, default=32, help="evaluation windows (default 32)")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto", help=_BOS_HELP)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help=_DTYPE_HELP)
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument(
        "--device-map", default=None, help="split a model too large for one GPU over all visible GPUs: auto"
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="windows per evaluation forward (default: about 16k tokens on CUDA, else --batch-size)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile evaluation (default: auto, on for models >= 100M params on one GPU)",
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="evaluate eagerly")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esa", description="Extreme Sensitivity Analysis of LLM weights")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="baseline, scores, selections, perturbations, artifacts")
    _common(run)
    run.add_argument(
        "--metric",
        dest="metrics",
        type=_csv,
        default=["grad_x_weight"],
        help="metric(s), comma-separated (esa metrics lists them)",
    )
    run.add_argument("--mode", choices=["per_layer", "global"], default="per_layer")
    run.add_argument(
        "--topk", type=int, default=100, help="k weights per tensor (per_layer) or overall (global)"
    )
    run.add_argument(
        "--calib-samples", type=int, default=None, help="calibration windows (default --max-samples)"
    )
    run.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    run.add_argument("--stability-check", action="store_true", help="pairwise Jaccard of top-k across seeds")
    run.add_argument(
        "--perturb",
        dest="perturbations",
        type=_csv,
        default=["sign_flip"],
        help="comma-separated perturbations (esa metrics lists them), default sign_flip",
    )
    run.add_argument(
        "--perturb-scale",
        type=float,
        default=None,
        help="gauss_noise sigma relative to |w| (default 0.02); factor for scale (default 0)",
    )
    run.add_argument(
        "--perturb-prob",
        type=float,
        default=None,
        help="probability each selected weight is hit (default 0.05 for bit_flip, 1 for the others)",
    )
    run.add_argument(
        "--perturb-bit",
        type=_bit,
        default=None,
        help="bit for bit_flip: sign, exponent_msb (default), exponent_lsb, mantissa_msb, or an index",
    )
    run.add_argument("--controls", type=_csv, default=["random_k", "bottom_k"])
    for flags, kwargs in _CURVATURE:
        run.add_argument(*flags, **kwargs)
    run.add_argument("--include-embeddings", action="store_true")
    run.add_argument("--include-norms", action="store_true")
    run.add_argument("--save-plots", action="store_true")
    run.add_argument("--vector-plots", action="store_true", help="with --save-plots: PDF and SVG copies too")
    run.add_argument("--out-dir", default=None, help=_OUT_HELP)
    run.add_argument("--overwrite", action="store_true", help="replace an out-dir that already holds results")
    run.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="recompute scores instead of using the cache",
    )
    run.add_argument(
        "--score-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="scores and gradient accumulators: fp32 (default) or bf16 (half the memory)",
    )
    for flags, kwargs in _OLD_RUNNER:
        run.add_argument(*flags, **kwargs)

    ev = sub.add_parser("eval", help="baseline perplexity / accuracy as JSON")
    _common(ev)

    det = sub.add_parser("detect", help="super-weight detector, magnitude ranks and PPL controls as JSON")
    det.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP + " (default smollm2-135m)")
    det.add_argument("--data-file", default=None, help=_DATA_HELP)
    det.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    det.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    det.add_argument("--bos", choices=["auto", "always", "never"], default="auto", help=_BOS_HELP)
    det.add_argument("--seed", type=int, default=0, help="seed of the random-weight control (default 0)")
    det.add_argument(
        "--threshold", type=float, default=50.0, help="|activation| a spike must exceed (default 50)"
    )
    det.add_argument("--top", type=int, default=3, help="candidates kept, largest first (default 3)")
    det.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help=_DTYPE_HELP)
    det.add_argument("--device", default=None, help=_DEVICE_HELP)
    det.add_argument("--verbose", "-v", action="store_true")

    rec = sub.add_parser("record", help="record the falsified claims of a claims.json as known outcomes")
    rec.add_argument("claims_json", help="reports/claims.json of a full run")
    rec.add_argument("--model", required=True, help="record the claims run on this model")
    rec.add_argument("--recorded-dir", default="experiments/recorded")
    rec.add_argument("--note", default="", help="reviewer's note stored with each entry")

    sub.add_parser("models", help="list the model registry and hub aliases")
    sub.add_parser("metrics", help="list the sensitivity metrics and perturbations")
    cli_cache.add_parser(sub)
    report_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(message)s"
    )
    if getattr(args, "no_progress", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        return _COMMANDS[args.command](args)
    except EsaError as exc:
        print(f"esa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esa: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    from dataclasses import fields

    from esa.runbook import ExperimentConfig, parse_int_list, run_experiment
    from esa.runbook.artifacts import format_summary
    from esa.runbook.config import default_out_dir

    _default_data(args, calib=True)
    names = {f.name for f in fields(ExperimentConfig)}  # the flags' dest names are the fields
    options = {k: v for k, v in vars(args).items() if k in names}
    options.update(seeds=parse_int_list(args.seeds), progress=not args.no_progress)
    options["advanced_perturbations"] = [m for v in args.advanced_perturbations for m in _csv(v)]
    if args.tasks is None:
        del options["tasks"]  # the config's default tasks
    config = ExperimentConfig(**options)
    if config.out_dir is None:
        config.validate()  # bad options fail before a directory name is chosen
        config.out_dir = str(default_out_dir(config))
    result = run_experiment(config)
    print(format_summary(result))
    return 0


def _eval(args) -> int:
    from esa.data import prepare_data
    from esa.evaluate import auto_batch_size, evaluate
    from esa.models import load_model
    from esa.util.serialize import jsonable

    for name, value in (
        ("--max-samples", args.max_samples),
        ("--max-length", args.max_length),
        ("--batch-size", args.batch_size),
    ):
        if value <= 0:
            raise EsaError(f"{name} must be a positive integer, got {value}")
    _default_data(args, calib=False)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    data = prepare_data(
        lm.tokenizer,
        args.data_file,
        None,
        args.max_length,
        args.max_samples,
        min_calib_windows=0,
        bos=args.bos,
    )
    batch = args.eval_batch_size or auto_batch_size(
        lm.model, int(data.eval_ids.shape[0]), int(data.eval_ids.shape[1]), args.batch_size
    )
    res = evaluate(
        lm.model, data.eval_ids, batch, not args.no_progress, check_leak=True, compile=args.compile
    )
    out = {
        "model": lm.describe(),
        "data": data.manifest()["eval"],
        "bos": data.bos,
        "max_length": args.max_length,
        "perplexity": res.ppl,
        **res.to_dict(),
    }
    print(json.dumps(jsonable(out), indent=2))
    return 0


def _detect(args) -> int:
    from esa.analyses.detect_run import detector_run
    from esa.data import prepare_data
    from esa.models import load_model

    for name, value, least in (
        ("--windows", args.windows, 1),
        ("--length", args.length, 2),
        ("--top", args.top, 1),
    ):
        if value < least:
            raise EsaError(f"{name} must be an integer >= {least}, got {value}")
    _default_data(args, calib=False)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    data = prepare_data(
        lm.tokenizer, args.data_file, None, args.length, args.windows, min_calib_windows=0, bos=args.bos
    )
    label = data.eval_source.name if args.data_file in (None, "builtin") else args.data_file
    bos = bool(data.bos.get("prepended"))
    out = detector_run(
        lm, data.eval_ids, data=label, seed=args.seed, threshold=args.threshold, top=args.top, bos=bos
    )
    print(json.dumps(out, indent=1))
    return 0


def _record(args) -> int:
    from esa.claims.recorded import record_outcome
    from esa.claims.report import load_claims

    try:
        claims = load_claims(args.claims_json)["claims"]
        header = load_claims(args.claims_json)["header"]
        tier, data_sha = header["tier"]["name"], header.get("data_sha256")
    except (OSError, ValueError, KeyError) as exc:
        raise EsaError(
            f"cannot read {args.claims_json} ({exc}): pass the claims.json of a full run"
        ) from None
    run_here = args.model in (load_claims(args.claims_json)["header"].get("models") or [])
    done = 0
    for c in claims:
        ctx_model = (c.get("context") or {}).get("model")
        session_level = not isinstance(ctx_model, str)  # over several models: kept per --esa-model
        if c["verdict"] == "falsified" and (ctx_model == args.model or (session_level and run_here)):
            measured = {k: v["value"] for k, v in c["measured"].items()}
            record_outcome(
                args.recorded_dir,
                args.model,
                c["id"],
                measured,
                args.note,
                tier=tier,
                data_sha256=data_sha,
                claim=c,
            )
            done += 1
    print(f"recorded {done} falsified claims of {args.model} (tier {tier}) in {args.recorded_dir}")
    return 0


def _models(args) -> int:
    from esa.models import list_models

    for row in list_models():
        print(f"{row['name']:<18}{row['source']:<10}{row['description']}")
    return 0


def _metrics(args) -> int:
    from esa.metrics.registry import METRICS
    from esa.perturb import PERTURBATIONS

    for name, spec in METRICS.items():
        print(f"metric       {name:<18}{getattr(spec, 'description', '')}")
    for name in PERTURBATIONS:
        print(f"perturbation {name}")
    return 0


_COMMANDS = {
    "run": _run,
    "eval": _eval,
    "detect": _detect,
    "models": _models,
    "metrics": _metrics,
    "record": _record,
    "cache": cli_cache.main,
    "report": report_cli.main,
}

if __name__ == "__main__":
    sys.exit(main())
