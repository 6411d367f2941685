"""The esa pytest plugin: claim verdicts, reports, recorded outcomes, xdist, options, EsaError."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch  # imported before any in-process pytester run: pytester drops modules a run imports

import esa.metrics  # (same reason: --esa-metric is checked against esa.metrics.METRICS)
import esa.plots  # (same reason: matplotlib must not be re-imported)
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
def test_skipped(claim):
    pytest.skip("not at this tier")

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
}


def _verdicts(path) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in load_claims(path)["claims"]}


def test_verdicts_numbers_and_reports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_claims=CLAIMS)
    result = pytester.runpytest("-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=4, failed=2, errors=2, skipped=1)
    doc = load_claims(pytester.path / "reports" / "claims.json")
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
    raw = (pytester.path / "reports" / "claims.json").read_text()
    assert '"value": "nan"' in raw and "NaN" not in raw
    assert "unknown model 'nope'" in claims["test_claims.py::test_setup_error"]["message"]
    assert "teardown exploded" in claims["test_claims.py::test_teardown_error"]["message"]
    crash = claims["test_claims.py::test_crash"]
    assert crash["message"] == "RuntimeError: shape mismatch" and crash["outcome"] == "failed"
    assert crash["measured"]["before_crash"]["value"] == 2
    assert doc["header"]["counts"]["holds"] == 2 and doc["header"]["counts"]["error"] == 3
    assert doc["header"]["windows_sha256"] == "abc123" and doc["header"]["tier"]["name"] == "smoke"
    md = (pytester.path / "reports" / "claims.md").read_text()
    html = (pytester.path / "reports" / "claims.html").read_text()
    for text in ("12.25", "42.5", "[11.5, 13]", "falsified", "Phase 2", "teardown exploded"):
        assert text in md and text in html
    assert "delta = 3.25 < 1.5" in md and "delta = 3.25 &lt; 1.5" in html  # html is escaped
    result.stdout.fnmatch_lines(
        [
            "*= esa claims =*",
            "FALSIFIED *test_claims.py::test_falsified*",
            "HOLDS *test_claims.py::test_ratio?tiny-a?*ratio=42.5*",
            "ERROR *test_claims.py::test_setup_error*",
            "SKIPPED *test_claims.py::test_skipped*",
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

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_still_false(claim, model):
    claim.expect(0.5, ">", 1.0, name="ratio")

@pytest.mark.phase4
@pytest.mark.parametrize("model", ["tiny-a"])
def test_now_true(claim, model):
    claim.expect(2.0, ">", 1.0, name="ratio")

@pytest.mark.phase4
@pytest.mark.xfail(strict=True, reason="known to fail on tiny models")
def test_marked_by_hand(claim):
    claim.expect(0.0, ">", 1.0, name="ratio")
"""


def test_recorded_outcomes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_rec=RECORDED)
    rec_dir = pytester.path / "experiments" / "recorded"
    record_outcome(
        rec_dir,
        "tiny-a",
        "test_rec.py::test_still_false[tiny-a]",
        {"ratio": 0.25},
        note="seed 0",
        day="2025-01-02",
    )
    record_outcome(rec_dir, "tiny-a", "test_rec.py::test_now_true[tiny-a]", {"ratio": 0.75}, day="2025-01-03")
    assert set(load_recorded(rec_dir / "tiny-a.json")) == {
        "test_rec.py::test_still_false[tiny-a]",
        "test_rec.py::test_now_true[tiny-a]",
    }
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(xfailed=2, failed=1)
    result.stdout.fnmatch_lines(["*recorded: falsified on tiny-a (2025-01-02): ratio=0.25*"])
    claims = {c["id"]: c for c in load_claims(pytester.path / "reports" / "claims.json")["claims"]}
    still = claims["test_rec.py::test_still_false[tiny-a]"]
    assert still["verdict"] == "falsified (recorded)" and still["outcome"] == "xfailed"
    assert still["recorded"] == {
        "model": "tiny-a",
        "claim_id": still["id"],
        "measured": {"ratio": 0.25},
        "date": "2025-01-02",
        "note": "seed 0",
    }
    now = claims["test_rec.py::test_now_true[tiny-a]"]
    assert now["verdict"] == "changed" and "XPASS(strict)" in now["message"]
    assert claims["test_rec.py::test_marked_by_hand"]["verdict"] == "falsified (recorded)"
    md = (pytester.path / "reports" / "claims.md").read_text()
    assert "| ratio | 0.5 |  | 0.25 |" in md and "| ratio | 2 |  | 0.75 |" in md
    result.stdout.fnmatch_lines(["CHANGED *test_now_true*", "FALSIFIED (RECORDED) *test_still_false*"])


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

    def comparable(doc):  # everything but timings, as JSON text (NaN-safe)
        return json.dumps(
            [{k: v for k, v in c.items() if k != "duration"} for c in doc["claims"]],
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
        verdicts = _verdicts(pytester.path / "reports" / "claims.json")
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
    html = (pytester.path / "reports" / "claims.html").read_text()
    md = (pytester.path / "reports" / "claims.md").read_text()
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
    doc = load_claims(pytester.path / "reports" / "claims.json")
    status = {c["id"].split("::")[1]: c["compare"]["status"] for c in doc["claims"]}
    assert status == {"test_a": "same", "test_b": "changed verdict", "test_d": "new"}
    assert doc["header"]["compare"]["removed"] == [{"id": "test_cmp.py::test_c", "verdict": "holds"}]
    assert doc["header"]["compare"]["counts"] == {"new": 1, "same": 1, "changed verdict": 1, "removed": 1}
    result.stdout.fnmatch_lines(["FALSIFIED *test_b*changed verdict, was holds*"])
    assert "test_cmp.py::test_c" in (pytester.path / "reports" / "claims.html").read_text()


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
        "report": "out",
        "n_plugins": 1,
    }
    (pytester.path / "corpus.txt").write_text("hello world\n" * 10)
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
        "--esa-report",
        "r2",
    )
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
    assert gauss.scale == 0.01 and gauss == Condition("grad_x_weight", 0, "top", "gauss_noise", scale=0.01)
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
    assert _verdicts(pytester.path / "reports" / "claims.json") == {"test_c.py::test_c": "holds"}
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
    assert c.expect(3, ">=") and c.expect(1, "<", 2) and c.expect(1, "!=", math.nan)
    with pytest.raises(pytest.fail.Exception, match=r"nan >= 2 does not hold"):
        c.expect(math.nan, ">=", name="n")
    with pytest.raises(pytest.fail.Exception, match="claim falsified: custom 7"):
        c.check(False, "custom 7")
    with pytest.raises(ValueError, match="unknown op"):
        c.expect(1, "=>", 2)
    assert [ch["ok"] for ch in c.checks] == [True, True, True, False, False]
