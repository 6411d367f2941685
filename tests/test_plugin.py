"""The esa pytest plugin: claim verdicts, reports, recorded outcomes, xdist, options, EsaError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch  # imported before any in-process pytester run: pytester drops modules a run imports

import esa.data  # (same reason: the default texts come from esa.data at configure)
import esa.metrics  # (same reason: --esa-metric is checked against esa.metrics.METRICS)
import esa.plots  # (same reason: matplotlib must not be re-imported)
from esa.claims.claim import ClaimFalsified, ClaimInconclusive, parse_doc
from esa.claims.options import DEFAULT_METRIC, DEFAULT_TIER
from esa.claims.plugin import Claim, load_recorded, record_outcome
from esa.claims.report import load_claims
from esa.claims.tiers import TIERS
from esa.claims.workbench import Condition

pytest_plugins = ["pytester"]

CLAIMS = '''
import math
import pytest
from esa.errors import ModelError

@pytest.fixture
def broken_model():
    raise ModelError("unknown model 'nope': run `esa models` to list the available models")

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown exploded")

@pytest.mark.phase1
@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_ratio(claim, model, esa_header):
    """The top weight matters at least 10x more than random ones."""
    esa_header["windows_sha256"] = "abc123"
    claim("ratio >= 10", threshold=10.0, key="ratio")
    claim.context(model=model, metric="grad_x_weight", seeds=[0, 1, 2])
    claim.measure("ppl", 12.25, ci=(11.5, 13.0))
    claim.expect(42.5, ">=", name="ratio")

@pytest.mark.phase2
def test_falsified(claim):
    claim("random entries are harmless")
    claim.measure("nan_metric", float("nan"))
    claim.expect(3.25, "<", 1.5, name="delta")

@pytest.mark.phase2
def test_setup_error(claim, broken_model):
    claim("never reached")

@pytest.mark.phase3
def test_teardown_error(claim, bad_teardown):
    claim("holds but teardown fails").measure("x", 1)

@pytest.mark.phase3
def test_crash(claim):
    claim.measure("before_crash", 2)
    raise RuntimeError("shape mismatch")

@pytest.mark.phase3
def test_bare_assert(claim):
    assert 1 == 2, "a bare assert is not the claim's decision rule"

@pytest.mark.phase3
def test_skipped(claim):
    pytest.skip("not at this tier")

@pytest.mark.phase3
def test_nan_key(claim):
    claim("finite or nothing", threshold=1.0)
    claim.expect(float("nan"), ">", name="ratio")

@pytest.mark.phase3
@pytest.mark.min_tier("standard", reason="8 windows cannot resolve a 5% effect")
def test_below_tier(claim):
    claim.measure("effect", 0.01, key=True)
    claim.check(False, "effect 0.01 < 0.05")

def test_not_a_claim():
    pass
'''

VERDICTS = {
    "test_claims.py::test_ratio[tiny-a]": "holds",
    "test_claims.py::test_ratio[tiny-b]": "holds",
    "test_claims.py::test_falsified": "falsified",
    "test_claims.py::test_setup_error": "error",
    "test_claims.py::test_teardown_error": "error",
    "test_claims.py::test_skipped": "skipped",
    "test_claims.py::test_crash": "error",  # an exception in the body is not a falsification
    "test_claims.py::test_bare_assert": "error",  # only ClaimFalsified falsifies
    "test_claims.py::test_nan_key": "inconclusive",
    "test_claims.py::test_below_tier": "inconclusive",
}


def _verdicts(path) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in load_claims(path)["claims"]}


def test_verdicts_numbers_and_reports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_claims=CLAIMS)
    result = pytester.runpytest("-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=4, failed=3, errors=2, skipped=3)
    doc = load_claims(pytester.path / "reports" / "smoke" / "claims.json")
    claims = {c["id"]: c for c in doc["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == VERDICTS
    assert [c["id"] for c in doc["claims"]] == sorted(VERDICTS)
    ratio = claims["test_claims.py::test_ratio[tiny-a]"]
    assert ratio["measured"]["ppl"] == {"value": 12.25, "ci": [11.5, 13.0]}
    assert ratio["measured"]["ratio"]["value"] == 42.5 and ratio["key"] == "ratio"
    assert ratio["context"] == {"model": "tiny-a", "metric": "grad_x_weight", "seeds": [0, 1, 2]}
    assert ratio["phase"] == "phase1" and ratio["threshold"] == 10.0
    bad = claims["test_claims.py::test_falsified"]
    assert "delta = 3.25 < 1.5 does not hold" in bad["message"]
    assert math.isnan(bad["measured"]["nan_metric"]["value"])  # NaN survives the round trip
    raw = (pytester.path / "reports" / "smoke" / "claims.json").read_text()
    assert '"value": "nan"' in raw and "NaN" not in raw
    assert "unknown model 'nope'" in claims["test_claims.py::test_setup_error"]["message"]
    assert "teardown exploded" in claims["test_claims.py::test_teardown_error"]["message"]
    crash = claims["test_claims.py::test_crash"]
    assert crash["message"] == "RuntimeError: shape mismatch" and crash["outcome"] == "failed"
    assert crash["measured"]["before_crash"]["value"] == 2
    assert doc["header"]["counts"]["holds"] == 2 and doc["header"]["counts"]["error"] == 4
    assert doc["header"]["counts"]["inconclusive"] == 2
    nan_key = claims["test_claims.py::test_nan_key"]
    assert "non-finite measurement ratio = nan" in nan_key["message"] and nan_key["outcome"] == "skipped"
    below = claims["test_claims.py::test_below_tier"]
    assert below["min_tier"] == {"tier": "standard", "reason": "8 windows cannot resolve a 5% effect"}
    assert "below the minimum tier standard (this run: smoke)" in below["message"]
    assert below["measured"]["effect"]["value"] == 0.01  # measurements still recorded
    assert doc["header"]["windows_sha256"] == "abc123" and doc["header"]["tier"]["name"] == "smoke"
    peak = ratio["peak_memory"]  # the call phase's peak resident set (reset per claim on Linux)
    assert peak["rss_gib"] > 0 and peak["rss_scope"] in ("since reset", "process") and peak["gpu_gib"] is None
    assert claims["test_claims.py::test_setup_error"]["peak_memory"] is None  # no call phase
    md = (pytester.path / "reports" / "smoke" / "claims.md").read_text()
    html = (pytester.path / "reports" / "smoke" / "claims.html").read_text()
    for text in ("12.25", "42.5", "[11.5, 13]", "falsified", "Phase 2", "teardown exploded", "GiB"):
        assert text in md and text in html
    assert "delta = 3.25 < 1.5" in md and "delta = 3.25 &lt; 1.5" in html  # html is escaped
    result.stdout.fnmatch_lines(
        [
            "*= esa claims =*",
            "FALSIFIED *test_claims.py::test_falsified*",
            "INCONCLUSIVE *test_claims.py::test_nan_key*ratio=nan*",
            "HOLDS *test_claims.py::test_ratio?tiny-a?*ratio=42.5*",
            "ERROR *test_claims.py::test_setup_error*",
            "SKIPPED *test_claims.py::test_skipped*",
            "2 holds, 1 falsified, 2 inconclusive, 4 error, 1 skipped",
            "esa report: *claims.json*claims.md*claims.html",
        ]
    )
    assert "test_not_a_claim" not in result.stdout.str().split("esa claims")[1]


def test_esa_error_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_claims=CLAIMS)
    pytester.makepyfile(
        test_collect="""
from esa.errors import ModelError
raise ModelError("unknown model 'nope': run `esa models` to list the available models")
"""
    )
    result = pytester.runpytest(
        "test_claims.py::test_setup_error", "test_collect.py", "--continue-on-collection-errors"
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_collect.py*",
            "ModelError: unknown model 'nope': run `esa models`*",
            "*ERROR at setup of test_setup_error*",
            "ModelError: unknown model 'nope': run `esa models`*",
        ]
    )
    out = result.stdout.str()
    assert "Traceback" not in out and "def broken_model" not in out and "raise ModelError" not in out


RECORDED = """
import pytest

def measured(claim, value, threshold=1.0):
    claim(threshold=threshold, key="ratio")
    claim.expect(value, ">", name="ratio")

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_still_false(claim, model):
    measured(claim, 0.5)

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_within(claim, model):
    measured(claim, 0.52)

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_now_true(claim, model):
    measured(claim, 2.0)

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_moved(claim, model):
    measured(claim, 0.5)

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_threshold_moved(claim, model):
    measured(claim, 0.5, threshold=2.0)

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_crash(claim, model):
    raise RuntimeError("injected")

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_now_nan(claim, model):
    measured(claim, float("nan"))

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_legacy(claim, model):
    measured(claim, 0.5)

@pytest.mark.phase4
@pytest.mark.xfail(strict=True, reason="known to fail on tiny models")
def test_marked_by_hand(claim):
    claim.expect(0.0, ">", 1.0, name="ratio")

@pytest.mark.phase4
@pytest.mark.xfail(strict=True, reason="known to fail on tiny models")
def test_marked_crash(claim):
    raise TypeError("broken metric")
"""
RECORDED_VERDICTS = {
    "test_still_false[tiny-a]": "falsified (recorded)",
    "test_within[tiny-a]": "falsified (recorded)",
    "test_marked_by_hand": "falsified (recorded)",
    "test_now_true[tiny-a]": "changed",
    "test_moved[tiny-a]": "changed",
    "test_threshold_moved[tiny-a]": "changed",
    "test_now_nan[tiny-a]": "changed",
    "test_legacy[tiny-a]": "changed",
    "test_crash[tiny-a]": "error",
    "test_marked_crash": "error",
}


def _record_all(rec_dir) -> None:
    def rec(name, value, **kw):
        kw.setdefault("threshold", 1.0)
        record_outcome(rec_dir, "tiny-a", f"test_rec.py::{name}[tiny-a]", {"ratio": value}, key="ratio", **kw)

    rec("test_still_false", 0.5, note="seed 0", day="2025-01-02")
    rec("test_within", 0.5, day="2025-01-02")  # 0.52 is within the default 10%
    rec("test_now_true", 0.75, day="2025-01-03")
    rec("test_moved", 0.5 / 1000)  # the measured value is 1000x the recorded one
    rec("test_threshold_moved", 0.5)  # criteria.py moved the threshold from 1.0 to 2.0
    rec("test_crash", 0.5)
    rec("test_now_nan", 0.5)
    record_outcome(
        rec_dir, "tiny-a", "test_rec.py::test_legacy[tiny-a]", {"ratio": 0.5}
    )  # nothing to compare


def test_recorded_outcomes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_rec=RECORDED)
    rec_dir = pytester.path / "experiments" / "recorded"
    _record_all(rec_dir)
    assert len(load_recorded(rec_dir / "tiny-a.json")) == 8
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(xfailed=3, failed=7)
    result.stdout.fnmatch_lines(["*recorded: falsified on tiny-a (2025-01-02): ratio=0.5*"])
    claims = {
        c["name"]: c for c in load_claims(pytester.path / "reports" / "smoke" / "claims.json")["claims"]
    }
    assert {k: c["verdict"] for k, c in claims.items()} == RECORDED_VERDICTS
    still = claims["test_still_false[tiny-a]"]
    assert still["outcome"] == "xfailed"
    assert still["recorded"] == {
        "model": "tiny-a",
        "claim_id": still["id"],
        "verdict": "falsified",
        "key": "ratio",
        "key_value": 0.5,
        "threshold": 1.0,
        "tolerance": {"rel": 0.1, "abs": 1e-9},
        "measured": {"ratio": 0.5},
        "date": "2025-01-02",
        "note": "seed 0",
    }
    assert "XPASS(strict)" in claims["test_now_true[tiny-a]"]["message"]
    assert "ratio = 0.5, recorded 0.0005 (tolerance rel 0.1" in claims["test_moved[tiny-a]"]["message"]
    moved_thr = claims["test_threshold_moved[tiny-a]"]["message"]
    assert (
        "threshold changed since it was recorded (recorded 1, now 2)" in moved_thr
        and "re-record" in moved_thr
    )
    assert "now claim inconclusive: non-finite" in claims["test_now_nan[tiny-a]"]["message"]
    assert "has no key, key_value, threshold" in claims["test_legacy[tiny-a]"]["message"]
    assert claims["test_crash[tiny-a]"]["message"] == "RuntimeError: injected"
    assert claims["test_marked_crash"]["message"] == "TypeError: broken metric"
    md = (pytester.path / "reports" / "smoke" / "claims.md").read_text()
    assert "| ratio (key) | 0.5 |  | 0.5 |" in md and "| ratio (key) | 2 |  | 0.75 |" in md
    assert "Recorded falsified on tiny-a (2025-01-02): ratio = 0.5 (tolerance rel 0.1, abs 1e-09)" in md
    result.stdout.fnmatch_lines(["CHANGED *test_moved*", "FALSIFIED (RECORDED) *test_still_false*"])


@pytest.mark.parametrize(
    ("selected", "exit_code"),
    [
        ("test_still_false or test_within or test_marked_by_hand", pytest.ExitCode.OK),
        ("test_moved", pytest.ExitCode.TESTS_FAILED),
        ("test_threshold_moved", pytest.ExitCode.TESTS_FAILED),
        ("test_crash", pytest.ExitCode.TESTS_FAILED),  # a crash never passes as recorded
    ],
)
def test_recorded_exit_codes(pytester: pytest.Pytester, selected: str, exit_code: int) -> None:
    pytester.makepyfile(test_rec=RECORDED)
    _record_all(pytester.path / "experiments" / "recorded")
    assert pytester.runpytest("-k", selected).ret == exit_code


def test_xdist_matches_serial(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_claims=CLAIMS)
    record_outcome(
        pytester.path / "experiments" / "recorded",
        "tiny-b",
        "test_claims.py::test_ratio[tiny-b]",
        {"ratio": 1.0},
        day="2025-01-01",
    )
    pytester.runpytest_subprocess("-n", "0", "--esa-report", "serial")
    par = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "--esa-report", "par")
    assert "2 workers" in par.stdout.str() or "created: 2/2 workers" in par.stdout.str()
    a, b = (load_claims(pytester.path / d / "claims.json") for d in ("serial", "par"))
    expected = {**VERDICTS, "test_claims.py::test_ratio[tiny-b]": "changed"}
    assert _verdicts(pytester.path / "serial" / "claims.json") == expected
    assert _verdicts(pytester.path / "par" / "claims.json") == expected

    def comparable(doc):  # everything but timings and memory, as JSON text (NaN-safe)
        return json.dumps(
            [{k: v for k, v in c.items() if k not in ("duration", "peak_memory")} for c in doc["claims"]],
            sort_keys=True,
            default=str,
        )

    assert comparable(a) == comparable(b)
    assert b["header"]["windows_sha256"] == "abc123"  # written on a worker, merged by the controller
    assert not list((pytester.path / "par").glob("*.tmp"))
    par.stdout.fnmatch_lines(["*= esa claims =*", "CHANGED *test_ratio?tiny-b?*"])


def test_markers_and_gpu_skip(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marks="""
import pytest

@pytest.mark.phase1
@pytest.mark.phase2
@pytest.mark.phase3
@pytest.mark.phase4
@pytest.mark.phase5
@pytest.mark.smoke
@pytest.mark.slow
def test_all_markers(claim):
    claim.check(True, "fine")

@pytest.mark.gpu
def test_needs_gpu(claim):
    claim.check(True, "ran on a GPU")
"""
    )
    result = pytester.runpytest("--strict-markers", "-W", "error::pytest.PytestUnknownMarkWarning", "-rs")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*gpu: torch.cuda.is_available() is False*"])
        verdicts = _verdicts(pytester.path / "reports" / "smoke" / "claims.json")
        assert verdicts["test_marks.py::test_needs_gpu"] == "skipped"


def test_figure_lands_in_html_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_fig="""
import numpy as np
from esa.plots import plot_dose_response

def test_fig(claim):
    claim("figure").figure(plot_dose_response([1, 2, 4], {"a": [1, 2, 3]}), "dose curve")
    claim.figure(b"\\x89PNG\\r\\n\\x1a\\n-not-really", "raw bytes")
"""
    )
    pytester.runpytest().assert_outcomes(passed=1)
    html = (pytester.path / "reports" / "smoke" / "claims.html").read_text()
    md = (pytester.path / "reports" / "smoke" / "claims.md").read_text()
    assert 'src="data:image/png;base64,iVBORw0KGgo' in html and "dose curve" in html
    assert "dose curve" in md and "base64" not in md


def test_compare_with_previous(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_cmp="""
def test_a(claim): claim.check(True, "a")
def test_b(claim): claim.check(True, "b")
def test_c(claim): claim.check(True, "c")
"""
    )
    pytester.runpytest("--esa-report", "old").assert_outcomes(passed=3)
    pytester.makepyfile(
        test_cmp="""
def test_a(claim): claim.check(True, "a")
def test_b(claim): claim.check(False, "b broke")
def test_d(claim): claim.check(True, "d")
"""
    )
    result = pytester.runpytest("--esa-compare", "old/claims.json")
    doc = load_claims(pytester.path / "reports" / "smoke" / "claims.json")
    status = {c["id"].split("::")[1]: c["compare"]["status"] for c in doc["claims"]}
    assert status == {"test_a": "same", "test_b": "changed verdict", "test_d": "new"}
    assert doc["header"]["compare"]["removed"] == [{"id": "test_cmp.py::test_c", "verdict": "holds"}]
    assert doc["header"]["compare"]["counts"] == {"new": 1, "same": 1, "changed verdict": 1, "removed": 1}
    result.stdout.fnmatch_lines(["FALSIFIED *test_b*changed verdict, was holds*"])
    assert "test_cmp.py::test_c" in (pytester.path / "reports" / "smoke" / "claims.html").read_text()


def test_options_ini_and_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nesa_models =\n    tiny-x\n    tiny-y\nesa_tier = standard\nesa_report = out\n"
    )
    pytester.makepyfile(
        test_opts="""
import json
def test_opts(esa_options, request):
    o = esa_options
    plugins = [p for p in request.config.pluginmanager.get_plugins()
               if getattr(p, "__name__", "") == "esa.claims.plugin"]
    print("OPTS", json.dumps({"models": o.models, "metrics": o.metrics, "tier": o.tier.name,
                              "max_length": o.tier.max_length, "device": o.device,
                              "data": o.data and str(o.data), "report": o.report_dir.name,
                              "calib": o.calib_data and str(o.calib_data), "calib_spec": o.calib_spec,
                              "n_plugins": len(plugins)}))
"""
    )

    def opts(*args):
        result = pytester.runpytest("-s", *args)
        line = next(ln for ln in result.outlines if "OPTS " in ln)
        return json.loads(line.split("OPTS ", 1)[1])

    o = opts()
    assert o == {
        "models": ["tiny-x", "tiny-y"],
        "metrics": ["grad_x_weight"],
        "tier": "standard",
        "max_length": 512,
        "device": "auto",
        "data": None,
        "calib": None,
        "calib_spec": None,
        "report": "out",
        "n_plugins": 1,
    }
    (pytester.path / "corpus.txt").write_text("hello world\n" * 10)
    (pytester.path / "valid.txt").write_text("other words\n" * 10)
    o = opts(
        "--esa-model",
        "m1",
        "--esa-model",
        "m2",
        "--esa-metric",
        "hessian_diag",
        "--esa-tier",
        "smoke",
        "--esa-device",
        "cpu",
        "--esa-data",
        "corpus.txt",
        "--esa-calib-data",
        "valid.txt",
        "--esa-report",
        "r2",
    )
    assert o["calib"].endswith("valid.txt") and o["calib_spec"] == o["calib"]
    builtin = opts("--esa-data", "corpus.txt", "--esa-calib-data", "builtin")
    assert builtin["calib"] == "builtin" and builtin["calib_spec"] == "builtin"
    bad = pytester.runpytest("--esa-calib-data", "missing.txt")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--esa-calib-data missing.txt: no such file*"])
    assert o["models"] == ["m1", "m2"] and o["metrics"] == ["hessian_diag"] and o["tier"] == "smoke"
    assert o["device"] == "cpu" and o["data"].endswith("corpus.txt") and o["report"] == "r2"
    bad = pytester.runpytest("--esa-data", "missing.txt")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--esa-data missing.txt: no such file*"])
    bad = pytester.runpytest("--esa-metric", "grad_x_weight", "--esa-metric", "hessian")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--esa-metric hessian: unknown metric; use one of *hessian_diag*"])
    bad = pytester.runpytest("--esa-tier", "huge")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(
        [f"*invalid choice: 'huge' (choose from {', '.join(map(repr, sorted(TIERS)))})*"]
    )


def test_defaults_are_registered() -> None:
    assert DEFAULT_TIER in TIERS and DEFAULT_METRIC in esa.metrics.METRICS


def test_condition_takes_the_registered_default_scale() -> None:
    gauss = Condition("grad_x_weight", 0, "top", "gauss_noise")
    assert gauss.scale == 0.02 and gauss == Condition("grad_x_weight", 0, "top", "gauss_noise", scale=0.02)
    assert Condition("grad_x_weight", 0, "top", "gauss_noise", scale=0.05).scale == 0.05
    assert Condition("grad_x_weight", 0, "top", "zero").scale is None


def test_no_report_when_no_claims_or_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_x(): pass\n", test_c="def test_c(claim): pass\n")
    pytester.runpytest("test_plain.py").assert_outcomes(passed=1)
    assert not (pytester.path / "reports").exists()
    pytester.runpytest("--esa-no-report").assert_outcomes(passed=2)
    assert not (pytester.path / "reports").exists()


def test_explicit_plugin_without_autoload(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_c="def test_c(claim): claim.measure('v', 1.5)\n")
    result = pytester.runpytest_subprocess("-p", "esa")
    result.assert_outcomes(passed=1)
    assert _verdicts(pytester.path / "reports" / "smoke" / "claims.json") == {"test_c.py::test_c": "holds"}
    listed = pytester.runpytest_subprocess("-p", "esa", "--fixtures").stdout.str()
    assert all(f in listed for f in ("claim", "esa_options", "esa_workbench", "esa_header"))


def test_claim_api_coerces_and_checks() -> None:
    c = Claim("s")
    c("stated", threshold=np.float32(2.0), key="b")
    c.measure("a", np.int64(3), ci=(np.float64(1.0), torch.tensor(5.0)))
    c.measure("b", torch.tensor(0.5)).measure("arr", np.array([1.0, math.inf]))
    c.context(model="m", seeds=(0, 1), flag=np.bool_(True))
    assert c.measured["a"] == {"value": 3, "ci": [1.0, 5.0]} and type(c.measured["a"]["value"]) is int
    assert c.measured["arr"]["value"] == [1.0, math.inf] and c.threshold == 2.0
    assert c.ctx == {"model": "m", "seeds": [0, 1], "flag": True}
    assert c.expect(3, ">=") and c.expect(1, "<", 2)
    with pytest.raises(ClaimInconclusive, match=r"non-finite measurement n = nan"):
        c.expect(math.nan, ">=", name="n")  # NaN never satisfies (nor falsifies) a threshold
    with pytest.raises(ClaimInconclusive, match=r"threshold = inf"):
        c.expect(1, "!=", math.inf)
    with pytest.raises(ClaimFalsified, match="claim falsified: custom 7"):
        c.check(False, "custom 7")
    with pytest.raises(ClaimInconclusive, match="x = -inf"):
        c.require_finite(ok=1.0, x=-math.inf)
    with pytest.raises(ValueError, match="unknown op"):
        c.expect(1, "=>", 2)
    assert [ch["ok"] for ch in c.checks] == [True, True, None, None, False, None]
    assert issubclass(ClaimFalsified, AssertionError) and not issubclass(ClaimInconclusive, AssertionError)


def test_parse_doc_sections() -> None:
    doc = """Top weights matter 10x more than random ones.

    Hypothesis: zeroing the top-k entries hurts more
        than zeroing k random ones.
    Measurement: ΔPPL per set, bootstrap CI over windows.
    Decision: ratio >= 10 with the CI excluding zero.
    Minimum tier: standard (8 windows cannot resolve it).
    Falsified if: the ratio CI lies below 10.

    Free text after a blank line belongs to no section.
    """
    assert parse_doc(doc) == {
        "hypothesis": "zeroing the top-k entries hurts more than zeroing k random ones.",
        "measurement": "ΔPPL per set, bootstrap CI over windows.",
        "decision": "ratio >= 10 with the CI excluding zero.",
        "minimum_tier": "standard (8 windows cannot resolve it).",
        "falsified_if": "the ratio CI lies below 10.",
    }
    assert parse_doc(None) == {} and parse_doc("One line only.") == {}


TIERED = """
import pytest

@pytest.mark.phase1
@pytest.mark.min_tier("standard", reason="8 windows cannot resolve it")
def test_needs_standard(claim):
    \"\"\"Ratio above one.

    Hypothesis: the ratio exceeds one.
    Minimum tier: standard.
    \"\"\"
    claim(threshold=1.0).expect(2.0, ">", name="ratio")

@pytest.mark.min_tier("smoke", reason="cheap")
def test_at_smoke(claim):
    claim(threshold=1.0).expect(2.0, ">", name="ratio")

def test_inf(claim):
    claim(threshold=1.0).expect(float("inf"), ">", name="ratio")

def test_pytest_fail(claim):
    pytest.fail("not a decision rule")
"""


def test_inconclusive_and_min_tier(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tier=TIERED)
    smoke = pytester.runpytest("-rs", "--strict-markers")
    smoke.assert_outcomes(passed=1, skipped=2, failed=1)
    doc = load_claims(pytester.path / "reports" / "smoke" / "claims.json")
    claims = {c["name"]: c for c in doc["claims"]}
    assert {k: c["verdict"] for k, c in claims.items()} == {
        "test_needs_standard": "inconclusive",  # below its tier: never holds
        "test_at_smoke": "holds",
        "test_inf": "inconclusive",  # inf never satisfies a threshold
        "test_pytest_fail": "error",
    }
    needs = claims["test_needs_standard"]
    assert needs["measured"]["ratio"]["value"] == 2.0 and "(would be: holds)" in needs["message"]
    assert needs["doc"] == {"hypothesis": "the ratio exceeds one.", "minimum_tier": "standard."}
    smoke.stdout.fnmatch_lines(["*inconclusive: below the minimum tier standard (this run: smoke)*"])
    html = (pytester.path / "reports" / "smoke" / "claims.html").read_text()
    md = (pytester.path / "reports" / "smoke" / "claims.md").read_text()
    assert (
        "<dt>Hypothesis</dt><dd>the ratio exceeds one.</dd>" in html and "minimum tier</b> standard" in html
    )
    assert "- **Hypothesis:** the ratio exceeds one." in md and "- minimum tier: standard (8 windows" in md
    assert "calibration disjoint from evaluation: no" in html.lower() and "| inconclusive | 2 |" in md
    ok = pytester.runpytest("-k", "needs_standard or at_smoke or inf")
    assert ok.ret == pytest.ExitCode.OK  # inconclusive does not fail the run
    standard = pytester.runpytest("--esa-tier", "standard", "-k", "needs_standard")
    assert standard.ret == pytest.ExitCode.OK
    assert _verdicts(pytester.path / "reports" / "standard" / "claims.json") == {
        "test_tier.py::test_needs_standard": "holds"
    }
    assert "test_at_smoke" in (pytester.path / "reports" / "smoke" / "claims.md").read_text()  # kept
    pytester.makepyfile(test_bad='import pytest\n@pytest.mark.min_tier("huge")\ndef test_x(claim): pass\n')
    bad = pytester.runpytest("test_bad.py")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*min_tier 'huge' is not a tier; use one of smoke, standard, extended*"])


SHARED = """
import pytest

@pytest.mark.parametrize("model", ["tiny-a"])
@pytest.mark.parametrize("perturbation", ["zero", pytest.param("gauss_noise", marks=pytest.mark.shares("noise"))])
def test_param(claim, model, perturbation):
    claim(threshold=1)

@pytest.mark.shares("noise")
@pytest.mark.parametrize("model", ["tiny-a"])
def test_dose(claim, model):
    claim(threshold=1)
"""


def test_shares_marker_splits_a_files_worker_group(pytester: pytest.Pytester) -> None:
    """Claims of one model and file share an xdist group; a ``shares(key)`` claim joins the group
    of its key instead (measurements it shares with that group's claims, none with the others)."""
    from esa.claims.options import OPTIONS_KEY
    from esa.claims.plugin import worker_group

    items = pytester.getitems(SHARED)
    options = items[0].config.stash[OPTIONS_KEY]
    groups = {item.name: worker_group(item, options) for item in items}
    stem = items[0].path.stem
    assert groups == {
        "test_param[zero-tiny-a]": f"tiny-a-{stem}",
        "test_param[gauss_noise-tiny-a]": f"tiny-a-{stem}-noise",
        "test_dose[tiny-a]": f"tiny-a-{stem}-noise",
    }


SHARED_DIR = """
import os

import pytest

@pytest.mark.parametrize("i", range(4))
def test_dir(esa_workbench, i):
    root = esa_workbench.shared.root
    assert root is not None and root.is_dir()
    with open("roots.txt", "a") as fh:
        fh.write(f"{os.getpid()} {root}\\n")
"""


def test_xdist_workers_share_one_results_directory(pytester: pytest.Pytester) -> None:
    """The controller hands every worker the same shared-results directory (`esa.claims.shared`)
    and removes it at the end; without xdist there is none."""
    pytester.makepyfile(test_dir=SHARED_DIR)
    pytester.runpytest_subprocess("-n", "2", "-p", "xdist", "--dist", "load").assert_outcomes(passed=4)
    rows = [line.split() for line in (pytester.path / "roots.txt").read_text().splitlines()]
    assert len({pid for pid, _ in rows}) == 2 and len({root for _, root in rows}) == 1
    assert not Path(rows[0][1]).exists()
    pytester.runpytest_subprocess("-p", "no:xdist").assert_outcomes(failed=4)  # no workers: no directory


ORDER = """
import pytest

@pytest.mark.parametrize("model", ["tiny-a"])
@pytest.mark.parametrize("i", range(3))
def test_many(claim, model, i):
    claim(threshold=1)
    open("order.txt", "a").write("many\\n")

@pytest.mark.shares("slow")
@pytest.mark.parametrize("model", ["tiny-a"])
def test_slow(claim, model):
    claim(threshold=1)
    open("order.txt", "a").write("slow\\n")
"""


@pytest.mark.parametrize(
    ("slow", "many", "first"), [(None, None, "many"), (100.0, 1.0, "slow"), (2.0, 1.0, "many")]
)
def test_loadgroup_hands_out_the_longest_group_first(pytester: pytest.Pytester, slow, many, first) -> None:
    """Under ``--dist loadgroup`` the group the last report measured longest (summed over its
    claims) goes out first; with no report xdist's order: the group with more tests first."""
    from esa.claims.schedule import last_durations

    pytester.makepyfile(test_order=ORDER)
    rep = pytester.path / "rep"
    if slow is not None:
        rep.mkdir()
        durations = {"test_order.py::test_slow[tiny-a]": slow}
        durations.update({f"test_order.py::test_many[{i}-tiny-a]": many for i in range(3)})
        claims = [{"id": k, "duration": v} for k, v in durations.items()]
        (rep / "claims.json").write_text(json.dumps({"claims": claims}))
        assert last_durations(rep) == durations
    out = pytester.runpytest_subprocess(
        "-n", "1", "-p", "xdist", "--dist", "loadgroup", "--esa-report", "rep"
    )
    out.assert_outcomes(passed=4)
    assert (pytester.path / "order.txt").read_text().split()[0] == first


def test_last_durations_without_a_readable_report(tmp_path) -> None:
    from esa.claims.schedule import last_durations

    assert last_durations(None) == {} and last_durations(tmp_path) == {}
    (tmp_path / "claims.json").write_text("{not json")
    assert last_durations(tmp_path) == {}
