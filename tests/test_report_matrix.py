"""The claims report as a reader meets it: the claims x models matrix first (parsed from the
HTML), then contents and details; header tables instead of k=v strings; case columns that keep
names whole; the Markdown twin in the same order; files readable by others (0644)."""

from __future__ import annotations

import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

from esa.claims.report import load_claims, write_reports
from esa.claims.report_format import anchor, function_name
from esa.claims.report_matrix import HEADLINE, build_matrix

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reports" / "two_models.json"


class _Tables(HTMLParser):
    """Tables of an HTML page (class, rows of (text, hrefs) per cell), ids and h2 ids in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[tuple[str, list[str]]]]]] = []
        self.ids: set[str] = set()
        self.h2: list[str] = []
        self._stack: list[list] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "h2":
            self.h2.append(a.get("id", ""))
        elif tag == "table":
            self._stack.append([a.get("class", ""), []])
        elif tag == "tr" and self._stack:
            self._stack[-1][1].append([])
        elif tag in ("td", "th") and self._stack:
            self._stack[-1][1][-1].append(["", []])
        elif tag == "a" and self._stack and self._stack[-1][1] and self._stack[-1][1][-1]:
            self._stack[-1][1][-1][-1][1].append(a.get("href", ""))

    def handle_endtag(self, tag) -> None:
        if tag == "table" and self._stack:
            kind, rows = self._stack.pop()
            self.tables.append((kind, [[(t.strip(), h) for t, h in r] for r in rows]))

    def handle_data(self, data) -> None:
        if self._stack and self._stack[-1][1] and self._stack[-1][1][-1]:
            self._stack[-1][1][-1][-1][0] += data


def test_two_models_report_opens_with_the_matrix(tmp_path) -> None:
    doc = load_claims(FIXTURE)
    old = os.umask(0o022)
    try:
        paths = write_reports(doc["claims"], doc["header"], tmp_path)
    finally:
        os.umask(old)
    assert all(
        stat.S_IMODE(p.stat().st_mode) == 0o644 for p in [*paths.values(), *tmp_path.glob("figures/*")]
    )
    page = _Tables()
    page.feed(paths["html"].read_text())
    assert page.h2[:3] == ["answer", "", "run"]  # the answer, then the contents, then the details
    kind, rows = page.tables[0]
    models = list(doc["header"]["models"])
    assert kind == "matrix" and [t for t, _ in rows[0]] == ["claim", "case", "across models", *models]
    by_anchor = {anchor(c): c for c in doc["claims"]}
    cells = [cell for r in rows[1:] for cell in r[2:] if cell[1]]
    assert len(cells) == sum(function_name(c) in dict(HEADLINE) for c in doc["claims"])
    for text, hrefs in cells:  # each cell links to its claim's details and shows its verdict
        claim = by_anchor[hrefs[0][1:]]
        assert hrefs[0][1:] in page.ids and text.startswith(claim["verdict"])
    labels = [r[0][0] for r in rows[1:] if r[0][0]]
    assert labels == [label for _, label in HEADLINE]  # every headline claim, in order, once
    md = paths["md"].read_text()
    assert md.index("## Does the super-weight") < md.index("## Contents") < md.index("## Run")
    answer = md.split("## Does the super-weight")[1].split("## Contents")[0]
    assert len([r for r in answer.splitlines() if r.startswith("| ")]) == len(rows)  # header + rows
    run = next(r for k, r in page.tables if k == "kv")
    assert not [t for row in run for t, _ in row if re.search(r"\w=\w", t)]  # no k=v strings
    grid = next(r for k, r in page.tables if k == "grid" and r[0][0][0] == "model")
    assert [row[0][0] for row in grid[1:]] == models and "weights hash" in [t for t, _ in grid[0]]


def test_phase_tables_split_the_case_and_keep_names_whole(tmp_path) -> None:
    doc = load_claims(FIXTURE)
    html = write_reports(doc["claims"], doc["header"], tmp_path)["html"].read_text()
    page = _Tables()
    page.feed(html)
    phase3 = next(r for k, r in page.tables if k == "" and r[0][0][0] == "verdict" and len(r) > 10)
    assert [t for t, _ in phase3[0]][:6] == ["verdict", "claim", "model", "metric", "perturbation", "variant"]
    for model in doc["header"]["models"]:
        assert f'<span class="nw">{model}</span>' in html  # names never break mid-word
    assert "word-break:break-all" not in html.split("td.hash")[0]  # only hashes may break anywhere


def test_matrix_metrics_series_and_fallback() -> None:
    def rec(fn, model, metric, verdict="holds", **ctx):
        cid = f"t.py::{fn}[{model}-{metric}]"
        return {"id": cid, "verdict": verdict, "context": {"model": model, "metric": metric, **ctx}}

    claims = [
        rec("test_topk_stable_across_seeds", "m1", "a"),
        rec("test_topk_stable_across_seeds", "m1", "b", "falsified"),
        rec("test_super_beats_random", "m2", "a", perturbation="zero"),
        rec("test_super_beats_random", ["m1", "m2"], "a", perturbation="zero"),
        {"id": "t.py::test_other", "verdict": "holds"},
    ]
    m = build_matrix(claims, {"models": ["m2", "m1"]})
    assert m["headline"] and m["metric_rows"] and m["columns"] == ["across models", "m2", "m1"]
    assert [(r["label"], r["metric"], r["variant"]) for r in m["rows"]] == [
        ("seed stability", "a", ""),
        ("seed stability", "b", ""),
        ("super vs random", "a", "zero"),
    ]
    assert m["rows"][1]["cells"]["m1"]["verdict"] == "falsified" and "m2" not in m["rows"][1]["cells"]
    assert m["rows"][2]["cells"]["across models"]["verdict"] == "holds"  # a claim over both models
    other = {"id": "t.py::test_other_thing[x]", "verdict": "error", "context": {"model": "x"}}
    partial = build_matrix([other, rec("test_dose_response_monotonic", "x", "a")])  # one headline claim
    assert not partial["headline"] and [r["label"] for r in partial["rows"]] == [
        "dose response",
        "other thing",
    ]


def test_compare_shows_values_side_by_side(tmp_path) -> None:
    base = {"id": "t.py::test_super_beats_random[m-a-zero]", "key": "ratio", "context": {"model": "m"}}
    old = [{**base, "verdict": "holds", "measured": {"ratio": {"value": 40.0, "ci": None}}}]
    new = [{**base, "verdict": "falsified", "measured": {"ratio": {"value": 2.5, "ci": None}}}]
    first = write_reports(old, {}, tmp_path / "old")["json"]
    paths = write_reports(new, {}, tmp_path / "new", compare=first)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert "was holds, 40" in html and "| ratio (key) | 2.5 |  | 40 |" in md
    assert '<div class="was">was holds</div>' in html and "<br>was holds |" in md  # in the matrix too
    assert "changed verdict, was holds (40)" in md


def test_markdown_tables_are_well_formed(tmp_path) -> None:
    """Every Markdown table row has as many cells as its header (escaped pipes do not count)."""
    doc = load_claims(FIXTURE)
    md = write_reports(doc["claims"], doc["header"], tmp_path, compare=FIXTURE)["md"].read_text()
    width, tables = None, 0
    for line in md.splitlines():
        cells = len(re.findall(r"(?<!\\)\|", line)) if line.startswith("|") else None
        if cells is not None and width is None:
            width, tables = cells, tables + 1
        assert cells is None or cells == width, line
        width = width if cells is not None else None
    assert tables >= 10
