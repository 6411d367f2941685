"""The report's tables that are not the claims matrix: the run header as real tables (run,
versions, tier, models, data) and the ΔPPL tables (from the claims' ``delta_ppl_<set>``
measurements, or from an ``esa run`` results.json summary).

Each table is ``{"columns": [label, ...], "rows": [[cell, ...], ...]}`` of plain strings (cells
already formatted by `fmt`), so the HTML, Markdown and LaTeX writers only lay them out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from esa.claims.report_format import case, fmt, names

VERSION_KEYS = ("esa", "python", "torch", "transformers", "pytest")
RUN_KEYS = (  # header key -> label, in this order; unknown scalar keys follow
    ("args", "command"),
    ("started", "started"),
    ("duration_s", "duration (s)"),
    ("exit_status", "exit status"),
    ("git_commit", "git commit"),
    ("metrics", "metrics"),
    ("device", "device"),
    ("cuda", "cuda"),
    ("cpu_count", "CPU cores"),
    ("host", "host"),
    ("platform", "platform"),
    ("executable", "python executable"),
    ("rootdir", "root directory"),
)
SHOWN_ELSEWHERE = {"models", "data", "tier", "counts", "compare", "generated", *VERSION_KEYS}
SHOWN_ELSEWHERE |= {"eval_data", "data_sha256", "calib_data", "calib_data_sha256"}
MODEL_KEYS = (
    ("name", "model"),
    ("source", "source"),
    ("architecture", "architecture"),
    ("num_parameters", "parameters"),
    ("dtype", "dtype"),
    ("device", "device"),
)
WEIGHT_KEYS = ("weights_sha256", "gguf_sha256", "sha256", "fingerprint")  # first present is shown
_KNOWN_SOURCE = ("name", "path", "sha256", "chars", "windows_total", "windows_used", "windows_pool", "split")
DELTA = re.compile(r"^delta_ppl_([a-z]+)$")  # delta_ppl_super, delta_ppl_random, delta_ppl_bottom
SET_ORDER = ("super", "random", "bottom")
RUN_SETS = {"super": "super", "random_k": "random", "bottom_k": "bottom"}


def table(columns, rows) -> dict:
    return {"columns": list(columns), "rows": [list(r) for r in rows]}


def run_rows(header: Mapping) -> list[tuple[str, object]]:
    """(label, value) of the run's scalar entries: command, timing, commit, machine; then any
    entry a fixture added (a mapping value stays a mapping: the writers nest it as a table)."""
    known = [(label, header[k]) for k, label in RUN_KEYS if k in header]
    done = {k for k, _ in RUN_KEYS} | SHOWN_ELSEWHERE
    return known + [(k, v) for k, v in header.items() if k not in done]


def versions_table(header: Mapping) -> dict:
    """One row: the versions of esa, Python, torch, transformers and pytest."""
    keys = [k for k in VERSION_KEYS if k in header]
    return table(keys, [[fmt(header[k]) for k in keys]] if keys else [])


def tier_table(header: Mapping) -> dict:
    """One row: the compute tier's settings (name, window length, windows, seeds, top-k, ...)."""
    tier = header.get("tier")
    if not isinstance(tier, Mapping):
        return table(["tier"], [[fmt(tier)]] if tier else [])
    return table(
        tier.keys(), [[", ".join(map(fmt, v)) if isinstance(v, list) else fmt(v) for v in tier.values()]]
    )


def _parameters(n) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else fmt(n)


def model_names(header: Mapping, claims=()) -> list[str]:
    """Every model the run touched, in order: the header's models, those with a data manifest,
    those the claims name in their context (``model``)."""
    models = header.get("models")
    found = list(models) if isinstance(models, Mapping) else names(models)
    found += list(header.get("data") or {}) if isinstance(header.get("data"), Mapping) else []
    found += [m for c in claims for m in names((c.get("context") or {}).get("model"))]
    return list(dict.fromkeys(found))


def models_table(header: Mapping, claims=()) -> dict:
    """One row per model (`model_names`; ``header["models"]`` maps a name to its
    ``LoadedModel.describe()``): name, source, architecture, parameters, dtype, device, the
    weights' hash (sha256 of the weights or of the GGUF file, else esa's fingerprint) and any
    further identity entries."""
    models = header.get("models")
    known = models if isinstance(models, Mapping) else {}
    entries = [
        {"name": n, **(known[n] if isinstance(known.get(n), Mapping) else {})}
        for n in model_names(header, claims)
    ]
    keys = [k for k, _ in MODEL_KEYS if any(k in e for e in entries)]
    hashed = any(k in e for e in entries for k in WEIGHT_KEYS)
    extra = list(
        dict.fromkeys(k for e in entries for k in e if k not in dict(MODEL_KEYS) and k not in WEIGHT_KEYS)
    )
    labels = [dict(MODEL_KEYS)[k] for k in keys] + (["weights hash"] if hashed else []) + extra
    rows = []
    for e in entries:
        row = [_parameters(e.get(k)) if k == "num_parameters" else fmt(e.get(k)) for k in keys]
        if hashed:
            kind = next((k for k in WEIGHT_KEYS if k in e), None)
            row.append(f"{kind.replace('_', ' ')}: {fmt(e[kind])}" if kind else "–")
        rows.append(row + [fmt(e.get(k)) for k in extra])
    return table(labels, rows)


def _disjoint_text(manifest: Mapping) -> bool:
    """The data layer's ``calibration_disjoint`` when the manifest has it, else different sha256."""
    if "calibration_disjoint" in manifest:
        return bool(manifest["calibration_disjoint"])
    ev, cal = manifest["eval"], manifest.get("calibration") or {}
    return bool(cal.get("sha256")) and cal.get("sha256") != ev.get("sha256")


def _text_name(source: Mapping):
    split = source.get("split")
    return f"{source.get('name')} ({split})" if split else source.get("name")


def data_rows(header: Mapping) -> list[dict]:
    """One row per model of the header's data manifests (``header["data"][model]``, from
    ``DataBundle.manifest``): evaluation and calibration text (name and split, sha256, windows),
    whether the calibration is disjoint from the evaluation text (the manifest's
    ``calibration_disjoint``, else a different sha256), BOS handling, and any further calibration
    entries (e.g. where it comes from)."""
    manifests = header.get("data")
    rows = []
    for model, m in manifests.items() if isinstance(manifests, Mapping) else ():
        if not isinstance(m, Mapping) or not isinstance(m.get("eval"), Mapping):
            continue
        ev, cal = m["eval"], m.get("calibration") or {}
        rows.append(
            {
                "model": model,
                "eval": _text_name(ev),
                "eval_sha256": ev.get("sha256"),
                "eval_windows": f"{fmt(ev.get('windows_used'))} of {fmt(ev.get('windows_total'))}",
                "calib": _text_name(cal),
                "calib_sha256": cal.get("sha256"),
                "calib_windows": f"pool {fmt(cal.get('windows_pool'))}",
                "disjoint": "yes" if _disjoint_text(m) else "no",
                "bos": m.get("bos", ev.get("bos")),
                "more": {k: v for k, v in cal.items() if k not in _KNOWN_SOURCE},
                "max_length": m.get("max_length"),
            }
        )
    return rows


def disjoint(header: Mapping, rows: list[dict]) -> str:
    """ "yes" when every model's calibration text differs from its evaluation text (from the data
    manifests; without any, from the header's evaluation and calibration entries), else "no"."""
    if rows:
        return "yes" if all(r["disjoint"] == "yes" for r in rows) else "no"
    calib, ev = header.get("calib_data_sha256"), header.get("data_sha256")
    builtin_calib = (
        header.get("calib_data") == "built-in corpus" and header.get("eval_data") != "built-in corpus"
    )
    return "yes" if (calib and calib != ev) or builtin_calib else "no"


def _sets(found) -> list[str]:
    seen = list(dict.fromkeys(s for cells in found for s in cells))
    return [s for s in SET_ORDER if s in seen] + [s for s in seen if s not in SET_ORDER]


def _value(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def delta_ppl_rows(claims, models=()) -> list[dict]:
    """The ΔPPL of each perturbed set, from the claims' scalar ``delta_ppl_<set>`` measurements
    (ΔPPL = PPL(perturbed) − PPL(baseline), mean over seeds, 95% CI from the paired bootstrap over
    evaluation windows): one row per (model, metric, perturbation, variant), ``sets`` = {set:
    (value, ci)}, the first claim that measured a set wins (several claims measure the same one);
    rows by model (in the order of `models`, then as found), metric, perturbation, variant."""
    rows: dict[tuple, dict] = {}
    for c in sorted(claims, key=lambda c: c.get("id", "")):
        k = case(c)
        if len(k["model"]) != 1 or len(k["perturbation"]) != 1:
            continue
        key = (k["model"][0], ", ".join(k["metric"]), k["perturbation"][0], " · ".join(k["variant"]))
        for name, m in (c.get("measured") or {}).items():
            hit = DELTA.match(name)
            if hit and isinstance(m, Mapping) and _value(m.get("value")):
                row = rows.setdefault(
                    key, dict(zip(("model", "metric", "perturbation", "variant"), key), sets={})
                )
                row["sets"].setdefault(hit.group(1), (m["value"], m.get("ci")))
    return sorted(rows.values(), key=_order([*models, *(r["model"] for r in rows.values())]))


def _order(models: list[str]):
    """Sort key of ΔPPL rows: model in first-seen order of `models`, then metric, perturbation,
    variant (no variant first)."""
    rank = {m: i for i, m in enumerate(dict.fromkeys(models))}
    return lambda r: (rank.get(r["model"], len(rank)), r["metric"], r["perturbation"], r["variant"])


def run_delta_ppl_rows(results: Mapping, model: str = "") -> list[dict]:
    """The same rows from an ``esa run`` results.json (``summary``: metric, perturbation,
    condition, mean_delta_ppl, ci95); conditions random_k / bottom_k become random / bottom."""
    rows: dict[tuple, dict] = {}
    for s in results.get("summary") or []:
        key = (model, str(s["metric"]), str(s["perturbation"]), "")
        row = rows.setdefault(key, dict(zip(("model", "metric", "perturbation", "variant"), key), sets={}))
        row["sets"][RUN_SETS.get(s["condition"], s["condition"])] = (s.get("mean_delta_ppl"), s.get("ci95"))
    return list(rows.values())


def delta_ppl_table(rows: list[dict], cell=None, text=str) -> dict:
    """Rows of `delta_ppl_rows` as a table: model, metric, perturbation (+ variant where any),
    then one ΔPPL column per set; `cell(value, ci)` formats a ΔPPL cell (default "value [low,
    high]"), `text` every other cell (LaTeX escapes them)."""
    cell = cell or (lambda v, ci: fmt(v) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""))
    sets = _sets(r["sets"] for r in rows)
    variant = any(r["variant"] for r in rows)
    labels = ["model", "metric", "perturbation"] + (["variant"] if variant else [])
    out = []
    for r in rows:
        head = [text(r[k]) for k in ("model", "metric", "perturbation")] + (
            [text(r["variant"])] if variant else []
        )
        out.append(head + [cell(*r["sets"][s]) if s in r["sets"] else text("–") for s in sets])
    return table(labels + [f"ΔPPL {s}" for s in sets], out)
