"""The BENCHMARKS.md tables of one results dict (``python -m esa.bench --report FILE.json``)."""

from __future__ import annotations

import json
from typing import Any

Rows = list[dict[str, Any]]


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    """``value`` formatted by ``fmt``; "–" when missing, ``str(value)`` when it does not format."""
    if value is None or value == "":
        return "–"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _eval(rows: Rows) -> list[str]:
    lines = [
        "### Evaluation forward (bf16, sdpa, 512-token windows)",
        "",
        "| architecture | params | batch | plain tok/s | esa tok/s | esa / plain | plain MFU | esa MFU "
        "| esa eager tok/s (/ plain) | compiled | warm-up s | plain peak GiB | esa peak GiB | |ΔNLL| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        eager = f"{r['esa_eager_tok_s']:,.0f} (x{r['eager_ratio']:.2f})" if "esa_eager_tok_s" in r else "–"
        lines.append(
            f"| {r['arch']} | {r['params'] / 1e9:.2f} B | {r['batch_size']} | {_f(r['plain_tok_s'])} "
            f"| {_f(r['esa_tok_s'])} | x{r['ratio']:.2f} | {r['plain_mfu']:.0%} | {r['esa_mfu']:.0%} "
            f"| {eager} | {r.get('esa_compiled')} | {_f(r.get('warmup_s'), '{:.1f}')} "
            f"| {r['plain_peak_gib']:.1f} | {r['esa_peak_gib']:.1f} | {r['nll_abs_diff']:.1e} |"
        )
    return lines


def _score(rows: Rows) -> list[str]:
    lines = [
        "### Scoring pass (calibration windows of 512 tokens)",
        "",
        "| architecture | variant | windows | batch | tok/s | seconds | peak GiB (GB) | checkpointing "
        "| accumulators offloaded |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    plain = {r["arch"]: r for r in rows if r["variant"].startswith("plain")}
    for r in rows:
        ratio = ""
        if r["arch"] in plain and not r["variant"].startswith("plain"):
            ratio = f" (x{r['tok_s'] / plain[r['arch']]['tok_s']:.2f})"
        plan = r.get("memory_plan") or {}
        peak = f"{r['peak_gib']:.1f} ({r.get('peak_gb', r['peak_gib'] * 1.073741824):.1f})"
        lines.append(
            f"| {r['arch']} | {r['variant']} | {r['windows']} | {r['batch_size']} | {_f(r['tok_s'])}{ratio} "
            f"| {r['seconds']:.1f} | {peak} | {r['checkpointing']} | {_f(plan.get('offloaded'))} |"
        )
    return lines


def _accuracy(rows: Rows) -> list[str]:
    lines = [
        "### grad_x_weight accuracy against the fp32 reference (same weights in fp32)",
        "",
        "| architecture | variant | windows x batch | top-100 overlap per tensor (mean / min) "
        "| global top-1000 overlap | median rel. max error |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['variant']} | {r['windows']} x {r['batch_size']} "
            f"| {r['topk_overlap_mean']:.3f} / {r['topk_overlap_min']:.2f} | {r['global_overlap']:.3f} "
            f"| {r['median_rel_max_err']:.1e} |"
        )
    return lines


def _hutchinson(rows: Rows) -> list[str]:
    lines = [
        "### hutchinson_diag cost",
        "",
        "| architecture | variant | windows x tokens | device cap GB | windows per term "
        "| accumulators offloaded | s (1 probe) | s (2 probes) | s per probe | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plan = r.get("plan") or {}
        where = _f(plan.get("offloaded")) if plan else ("out of memory" if r.get("error") else "–")
        lines.append(
            f"| {r['arch']} | {r.get('variant', 'esa')} | {r['windows']} x {r['length']} "
            f"| {_f(r.get('limit_gb'), '{:g}')} "
            f"| {_f(plan.get('batch_size'))} | {where} | {_f(r.get('seconds_1_samples'), '{:.2f}')} "
            f"| {_f(r.get('seconds_2_samples'), '{:.2f}')} | {_f(r.get('seconds_per_sample'), '{:.2f}')} "
            f"| {_f(r.get('peak_gib_2_samples', r.get('peak_gib_1_samples')), '{:.1f}')} |"
        )
    return lines


def _hessian(rows: Rows) -> list[str]:
    lines = [
        "### hessian_diag cost (exact: one Hessian-vector product per entry)",
        "",
        "| architecture | part | tensor | entries | seconds | s per HVP | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['part']} | {r['tensor']} | {r['entries']:,} | {r['seconds']:.2f} "
            f"| {r['seconds_per_hvp']:.4f} | {r['peak_gib']:.1f} |"
        )
    return lines


def _select(rows: Rows) -> list[str]:
    lines = [
        f"### Selection over all {rows[0]['entries'] / 1e9:.2f} B weights ({rows[0]['arch']})",
        "",
        "| mode | k | kind | seconds | extra GiB |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['k']} | {r['kind']} | {r['seconds']:.3f} | {r['extra_gib']:.3f} |")
    return lines


def _perturb(rows: Rows) -> list[str]:
    lines = [
        "### Perturb + restore (bit-exact, verified)",
        "",
        "| selection | method | entries | tensors | seconds | extra GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} k={r['k']} | {r['method']} | {r['n_selected']} | {r['tensors']} "
            f"| {r['seconds']:.3f} | {r['extra_gib']:.3f} |"
        )
    return lines


def _runbook(rows: Rows) -> list[str]:
    lines = [
        "### Runbook v2 end to end",
        "",
        "| architecture | mode | metrics | eval windows | calib windows (curvature) | conditions | evals run (reused) "
        "| score s | perturb+eval s | total s | wall s | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        curv = r.get("curvature_calib_windows")
        calib = f"{r['calib_windows']} ({curv})" if curv else f"{r['calib_windows']}"
        run = r.get("evals_run", r["conditions"] - (r["evals_reused"] or 0))
        lines.append(
            f"| {r['arch']} | {r.get('mode', 'per_layer')} | {len(r.get('metrics', []))} | {r['eval_windows']} "
            f"| {calib} | {r['conditions']} | {run} ({r['evals_reused']}) | {r['score_s']:.0f} "
            f"| {r['perturb_eval_s']:.0f} | {r['total_s']:.0f} | {r['wall_s']:.0f} | {r['peak_gib']:.1f} |"
        )
    if len(rows) > 1:
        lines += ["", f"All modes: {sum(r['wall_s'] for r in rows):.0f} s wall."]
    return lines


def _multi(rows: Rows) -> list[str]:
    lines = ["### Several GPUs (device_map)", "", "| architecture | part | numbers |", "|---|---|---|"]
    for r in rows:
        keep = {
            k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("arch", "part")
        }
        lines.append(f"| {r['arch']} | {r['part']} | {json.dumps(keep)} |")
    return lines


TABLES = {  # section -> its table, in report order
    "eval": _eval,
    "score": _score,
    "accuracy": _accuracy,
    "hutchinson": _hutchinson,
    "hessian": _hessian,
    "select": _select,
    "perturb": _perturb,
    "runbook": _runbook,
    "multi": _multi,
}


def markdown(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of one results dict: one table per section with rows (each
    followed by a blank line), then the recorded errors."""
    s = results.get("sections", {})
    lines: list[str] = []
    for name, table in TABLES.items():
        rows = s.get(name, {}).get("rows", [])
        if rows:
            lines += [*table(rows), ""]
    errors = [(name, e) for name, sec in s.items() for e in sec.get("errors", [])]
    if errors:
        lines += ["Errors recorded:", "", *(f"- {name}: {e}" for name, e in errors), ""]
    return "\n".join(lines)
