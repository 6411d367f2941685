"""esa.claims.report: JSON/Markdown/HTML claims reports, NaN handling, compare, plain coercion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from esa.claims.recorded import changed, load_recorded, record_outcome, within
from esa.claims.report import (
    compare_claims,
    count_verdicts,
    data_rows,
    fmt,
    key_measure,
    load_claims,
    write_reports,
)
from esa.util.serialize import decode, dumps, encode, plain

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _claims() -> list[dict]:
    return [
        {
            "id": "experiments/test_p2.py::test_b",
            "phase": "phase2",
            "markers": ["phase2"],
            "statement": "Bits flip <script>alert(1)</script> | pipes",
            "threshold": 1.5,
            "key": None,
            "measured": {"delta": {"value": math.nan, "ci": [math.inf, -math.inf]}},
            "context": {"model": "tiny-a"},
            "figures": [],
            "verdict": "falsified",
            "message": "delta = nan > 1.5 does not hold",
            "recorded": None,
            "duration": 0.5,
        },
        {
            "id": "experiments/test_p1.py::test_a[tiny-a]",
            "markers": ["phase1", "smoke"],
            "statement": "Top weights matter",
            "threshold": None,
            "key": "ratio",
            "measured": {"ppl": {"value": 12.0, "ci": None}, "ratio": {"value": 40.0, "ci": [30.0, 50.0]}},
            "context": {"model": "tiny-a", "seeds": [0, 1, 2]},
            "figures": [{"caption": "score histogram", "png_base64": PNG_B64}],
            "verdict": "falsified (recorded)",
            "message": "",
            "recorded": {"model": "tiny-a", "date": "2025-01-02", "measured": {"ratio": 0.5}, "note": "n"},
        },
        {"id": "experiments/test_x.py::test_minimal", "verdict": "error"},  # minimal record renders
    ]


def test_write_reports_files_and_content(tmp_path) -> None:
    paths = write_reports(_claims(), {"models": ["tiny-a"], "tier": {"name": "smoke"}}, tmp_path / "r")
    assert set(paths) == {"json", "md", "html", "tex"} and all(p.is_file() for p in paths.values())
    assert not list((tmp_path / "r").glob(".*.tmp"))
    raw = paths["json"].read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    doc = load_claims(paths["json"])
    assert [c["id"] for c in doc["claims"]] == sorted(c["id"] for c in _claims())
    b = next(c for c in doc["claims"] if c["id"].endswith("test_b"))
    delta = b["measured"]["delta"]
    assert math.isnan(delta["value"]) and delta["ci"] == [math.inf, -math.inf]
    assert b["statement"].startswith("Bits flip")  # strings outside "measured" are not decoded
    assert doc["header"]["counts"]["falsified"] == 1 and doc["header"]["counts"]["holds"] == 0

    html = paths["html"].read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f"data:image/png;base64,{PNG_B64}" in html and "score histogram" in html
    assert html.index("Phase 1") < html.index("Phase 2") < html.index("Other claims")
    assert "2025-01-02" in html and "0.5" in html  # recorded value next to the new one
    assert "[inf, -inf]" in html and "nan" in html

    md = paths["md"].read_text()
    assert PNG_B64 not in md and "score histogram" in md
    assert "> Bits flip <script>alert(1)</script> | pipes" in md  # a blockquote, not a table cell
    assert "| ratio (key) | 40 | [30, 50] | 0.5 |" in md
    assert md.index("## Phase 1") < md.index("## Phase 2")


def test_markdown_table_cells_escape_pipes(tmp_path) -> None:
    claims = [
        {"id": "t.py::test_a[x|y]", "verdict": "holds", "measured": {"a|b": {"value": 1.0, "ci": None}}}
    ]
    md = write_reports(claims, {}, tmp_path)["md"].read_text()
    assert "[`test_a[x\\|y]`](#t-test_a-x-y)" in md and "| a\\|b | 1 |" in md


def test_compare_claims_statuses(tmp_path) -> None:
    old = write_reports(_claims(), {}, tmp_path / "old")["json"]
    new = [dict(c) for c in _claims()[:2]]
    new[0]["verdict"] = "holds"
    new.append({"id": "experiments/test_new.py::test_n", "verdict": "holds"})
    annotated, summary = compare_claims(new, old)
    status = {
        c["id"].rsplit("::", 1)[1]: (c["compare"]["status"], c["compare"]["previous"]) for c in annotated
    }
    assert status == {
        "test_b": ("changed verdict", "falsified"),
        "test_n": ("new", None),
        "test_a[tiny-a]": ("same", "falsified (recorded)"),
    }
    assert summary["removed"] == [{"id": "experiments/test_x.py::test_minimal", "verdict": "error"}]
    assert summary["counts"] == {"new": 1, "same": 1, "changed verdict": 1, "removed": 1}
    paths = write_reports(new, {}, tmp_path / "new", compare=old)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert "changed verdict (was falsified)" in html and "Removed since the previous report" in html
    assert "compare: changed verdict (was falsified)" in md and "test_minimal` (was error)" in md
    assert load_claims(paths["json"])["header"]["compare"]["path"] == str(old)


def test_plain_coercion() -> None:
    value = {
        "f": np.float32(1.5),
        "i": np.int64(3),
        "b": np.bool_(False),
        "t": torch.tensor(2.5),
        "ti": torch.tensor([1, 2]),
        "bf": torch.tensor(1.0, dtype=torch.bfloat16),
        "a": np.array([[1, 2]]),
        "tup": (1, "x"),
        "s": {3, 1},
        "n": None,
        4: "key",
    }
    out = plain(value)
    assert out == {
        "f": 1.5,
        "i": 3,
        "b": False,
        "t": 2.5,
        "ti": [1, 2],
        "bf": 1.0,
        "a": [[1, 2]],
        "tup": [1, "x"],
        "s": [1, 3],
        "n": None,
        "4": "key",
    }
    assert type(out["f"]) is float and type(out["i"]) is int and type(out["b"]) is bool
    assert type(plain(np.float64(2.0))) is float


def test_encode_decode_nonfinite() -> None:
    rec = {"measured": {"x": {"value": math.nan, "ci": [-math.inf, math.inf]}}, "statement": "nan"}
    text = dumps(rec)
    assert "NaN" not in text and "Infinity" not in text
    back = decode(json.loads(text))
    assert math.isnan(back["measured"]["x"]["value"]) and back["measured"]["x"]["ci"] == [-math.inf, math.inf]
    assert back["statement"] == "nan" and encode([math.inf]) == ["inf"]


def test_helpers() -> None:
    assert fmt(12345678.0) == "1.235e+07" and fmt(16240.0) == "16240" and fmt(0.012345) == "0.01235"
    assert fmt(None) == "–" and fmt(True) == "true" and fmt(13.0) == "13" and fmt(math.nan) == "nan"
    assert fmt(list(range(20))).endswith("… (20 values)]")
    claim = {"key": "b", "measured": {"a": {"value": 1}, "b": {"value": 2}}}
    assert key_measure(claim) == ("b", 2) and key_measure({"measured": {}}) == (None, None)
    assert key_measure({"key": "zz", "measured": {"a": {"value": 1}}}) == ("a", 1)
    counts = count_verdicts([{"verdict": "holds"}, {"verdict": "holds"}, {"verdict": "weird"}])
    assert counts["holds"] == 2 and counts["weird"] == 1 and counts["error"] == 0


def test_recorded_outcomes_file(tmp_path) -> None:
    from esa.errors import ConfigError

    assert load_recorded(tmp_path / "missing.json") == {}
    path = record_outcome(
        tmp_path,
        "tiny-a",
        "experiments/t.py::test_x[tiny-a]",
        {"ratio": math.nan},
        note="first",
        day="2025-01-01",
    )
    record_outcome(tmp_path, "tiny-a", "experiments/t.py::test_x[tiny-a]", {"ratio": 0.5}, day="2025-02-01")
    record_outcome(tmp_path, "tiny-a", "experiments/t.py::test_a[tiny-a]", {"ratio": np.float32(2)})
    entries = json.loads(path.read_text())
    assert [e["claim_id"] for e in entries] == [
        "experiments/t.py::test_a[tiny-a]",
        "experiments/t.py::test_x[tiny-a]",
    ]
    assert entries[1] == {  # no key or threshold given: nothing a later run could compare
        "claim_id": "experiments/t.py::test_x[tiny-a]",
        "verdict": "falsified",
        "measured": {"ratio": 0.5},
        "date": "2025-02-01",
        "note": "",
    }
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="expected a JSON list"):
        load_recorded(tmp_path / "bad.json")


def test_record_outcome_from_the_claims_json_record(tmp_path) -> None:
    claim = {
        "id": "experiments/t.py::test_r[tiny-a]",
        "key": "ratio",
        "threshold": "inf",  # as load_claims leaves a non-finite threshold
        "measured": {"ratio": {"value": 0.25, "ci": None}, "ppl": {"value": math.inf, "ci": None}},
    }
    measured = {k: v["value"] for k, v in claim["measured"].items()}
    path = record_outcome(
        tmp_path, "tiny-a", claim["id"], measured, "n", day="2025-03-01", tier="standard", claim=claim
    )
    raw = json.loads(path.read_text())[0]
    assert raw == {
        "claim_id": claim["id"],
        "verdict": "falsified",
        "key": "ratio",
        "key_value": 0.25,
        "threshold": "inf",
        "tolerance": {"rel": 0.1, "abs": 1e-9},
        "measured": {"ratio": 0.25, "ppl": "inf"},
        "date": "2025-03-01",
        "note": "n",
        "tier": "standard",
    }
    entry = load_recorded(path)[(claim["id"], "standard")]
    assert entry["threshold"] == math.inf and entry["measured"]["ppl"] == math.inf
    now = {"ratio": {"value": 0.26}}
    assert changed(entry, now, math.inf) is None
    assert "ratio = 260, recorded 0.25" in changed(entry, {"ratio": {"value": 260.0}}, math.inf)
    assert "threshold changed" in changed(entry, now, 3.0)
    assert "'ratio' was not measured" in changed(entry, {}, math.inf)
    loose = {**entry, "tolerance": {"rel": 2000.0}}  # overridable per entry (abs keeps its floor)
    assert changed(loose, {"ratio": {"value": 260.0}}, math.inf) is None
    assert "has no key, key_value, threshold" in changed({"measured": {}}, now, None)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.none() | st.text(max_size=3))
def test_within_matches_itself(x) -> None:
    assert within(x, x) and within([x, {"a": x}], [x, {"a": x}], 0.1, 1e-9)


@given(finite.filter(lambda v: abs(v) > 1e-6 and abs(v) < 1e300))
def test_within_tolerance(x) -> None:
    assert within(x * 1.05, x, 0.1, 1e-9) and not within(x * 1000, x, 0.1, 1e-9)
    assert not within(-x, x, 0.1, 1e-9) and not within(math.nan, x, 0.1, 1e-9)
    assert not within(math.inf, x, 0.1, 1e-9) and not within(x, math.inf, 0.1, 1e-9)


def test_within_nonfinite() -> None:
    assert within(math.inf, math.inf) and within(-math.inf, -math.inf) and within(math.nan, math.nan)
    assert (
        not within(math.inf, -math.inf, 1e9, 1e9) and not within(1e-10, 0.0) and within(1e-10, 0.0, 0, 1e-9)
    )
    assert not within([1.0], [1.0, 2.0]) and not within({"a": 1.0}, {"b": 1.0}) and not within(True, 1)


def _manifest(eval_sha: str, calib_sha: str, calib_name: str = "valid.txt") -> dict:
    return {
        "max_length": 128,
        "eval": {"name": "wiki.test.raw", "sha256": eval_sha, "windows_total": 2000, "windows_used": 8},
        "calibration": {"name": calib_name, "sha256": calib_sha, "windows_pool": 400, "overlap": 0.02},
    }


def test_header_names_the_data_and_disjointness(tmp_path) -> None:
    header = {
        "eval_data": "/d/wiki.test.raw",
        "calib_data": "/d/valid.txt",
        "data": {
            "tiny-a": _manifest("e" * 64, "c" * 64),
            "tiny-b": _manifest("e" * 64, "e" * 64, "wiki.test.raw"),
        },
    }
    rows = data_rows(header)
    assert [(r["model"], r["disjoint"]) for r in rows] == [("tiny-a", "yes"), ("tiny-b", "no")]
    assert rows[0]["eval_windows"] == "8 of 2000" and rows[0]["more"] == {"overlap": 0.02}
    paths = write_reports([{"id": "t.py::test_a", "verdict": "inconclusive"}], header, tmp_path)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert (
        "calibration disjoint from evaluation: no" in html
        and "**Calibration disjoint from evaluation: no.**" in md
    )
    assert "| `tiny-a` | wiki.test.raw | `" + "e" * 64 + "` | 8 of 2000 × 128 tokens | valid.txt |" in md
    assert "c" * 64 in html and "pool 400" in html
    one = write_reports([], {**header, "data": {"tiny-a": header["data"]["tiny-a"]}}, tmp_path / "one")
    assert "Calibration disjoint from evaluation: yes." in one["md"].read_text()
    assert load_claims(paths["json"])["header"]["counts"]["inconclusive"] == 1
    no_manifest = write_reports([], {"eval_data": "built-in corpus", "calib_data": "x"}, tmp_path / "none")
    assert "Calibration disjoint from evaluation: no." in no_manifest["md"].read_text()


def test_atomic_write_gives_readable_files(tmp_path):
    """Reports are for others to read: 0666 & ~umask (0644 under the usual umask), not 0600."""
    import os
    import stat

    from esa.util.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "claims.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "claims.md").stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [tmp_path / "claims.md"]


def test_data_rows_show_split_and_bos() -> None:
    manifest = _manifest("e" * 64, "c" * 64)
    manifest["eval"]["split"], manifest["bos"] = "test", "auto: added"
    (row,) = data_rows({"data": {"tiny-a": manifest}})
    assert row["eval"] == "wiki.test.raw (test)" and row["bos"] == "auto: added"
    assert data_rows({"data": {"tiny-a": _manifest("e", "c")}})[0]["bos"] is None


def test_a_claim_is_recorded_once_per_tier(tmp_path) -> None:
    """Recording a claim at one tier keeps its entry at another (the smoke and standard recordings
    of one model share a file); recording it again at the same tier replaces that entry."""
    cid = "experiments/t.py::test_r[tiny-a]"
    for tier, value in (("smoke", 1.0), ("standard", 2.0), ("smoke", 3.0)):
        path = record_outcome(tmp_path, "tiny-a", cid, {"r": value}, tier=tier, key="r", threshold=5.0)
    entries = load_recorded(path)
    assert set(entries) == {(cid, "smoke"), (cid, "standard")}
    assert entries[(cid, "smoke")]["key_value"] == 3.0 and entries[(cid, "standard")]["key_value"] == 2.0
