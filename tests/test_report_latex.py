"""Paper tools: LaTeX tables (booktabs) of the claims matrix and ΔPPL, figures as PNG/PDF/SVG,
and ``esa report`` (esa.claims.report_cli). The tables compile through pdflatex when it is
installed; everywhere their structure is checked."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esa import plots
from esa.claims.claim import Claim
from esa.claims.report import load_claims, write_reports
from esa.claims.report_cli import add_parser, main
from esa.claims.report_latex import escape, latex_document, number
from esa.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reports" / "two_models.json"
SPECIALS = "_%&#$^~{}\\<>|"
pytest_plugins = ["pytester"]


def _unescaped(tex: str, ch: str) -> int:
    """Occurrences of `ch` not preceded by a backslash and outside math mode."""
    text = re.sub(r"\$[^$]*\$", "", tex)  # math: exponents, \infty, \times
    return len(re.findall(r"(?<!\\)" + re.escape(ch), text))


def _balanced(tex: str) -> bool:
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def check_structure(tex: str) -> int:
    """Assert booktabs structure; return the number of top-level tables."""
    assert _balanced(tex)
    for env in ("table", "tabular"):
        assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}")
    tables = re.findall(r"\\begin\{tabular\}\{([lrc]+)\}(.*?)\\bottomrule\n\\end\{tabular\}", tex, re.S)
    for align, body in tables:
        assert body.index("\\toprule") < body.index("\\midrule")
        rows = [line for line in body.splitlines() if line.endswith("\\\\")]
        assert rows and all(len(re.split(r"(?<!\\)&", r)) == len(align) for r in rows)
        for ch in "_%#":
            assert _unescaped(body, ch) == 0, ch
    return len(tables)


def _compile(tex: str, folder: Path) -> None:
    """Through pdflatex when installed: the document compiles to a PDF."""
    if shutil.which("pdflatex") is None:
        return
    (folder / "doc.tex").write_text(latex_document(tex), encoding="utf-8")
    run = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert (folder / "doc.pdf").read_bytes().startswith(b"%PDF")


@given(st.text(alphabet=st.sampled_from(list(SPECIALS + "aZ09 .-Δ×·–")), max_size=30))
def test_escape_leaves_no_special_character_bare(text) -> None:
    out = escape(text)
    assert _balanced(out)
    for ch in "_%&#~^":
        assert _unescaped(out, ch) == 0
    assert not set(re.sub(r"\$[^$]*\$", "", out)) & set("Δ×·–")  # non-ASCII symbols set in math/dashes


def test_numbers_in_math_mode() -> None:
    assert number(2.5e-5) == "$2.5\\times 10^{-5}$" and number(-3.0) == "$-3$"
    assert number(float("inf")) == "$\\infty$" and number(float("-inf")) == "$-\\infty$"
    assert number(float("nan")) == "nan" and number("w_1") == "w\\_1" and number(7) == "$7$"


def test_tables_from_two_models_compile(tmp_path) -> None:
    doc = load_claims(FIXTURE)
    tex = write_reports(doc["claims"], doc["header"], tmp_path)["tex"].read_text()
    assert check_structure(tex) == 2  # the matrix and the ΔPPL table
    models = list(doc["header"]["models"])
    header = next(line for line in tex.splitlines() if line.startswith("claim & case"))
    assert header.rstrip(" \\").split(" & ")[-len(models) :] == [escape(m) for m in models]
    assert "\\toprule" in tex and "$\\Delta$PPL super" in tex and "grad\\_x\\_weight" in tex
    for c in doc["claims"]:  # every headline verdict is in the matrix
        if "test_super_beats_random" in c["id"]:
            assert escape(c["verdict"]) in tex
    _compile(tex, tmp_path)


def test_hostile_names_are_escaped_and_compile(tmp_path) -> None:
    claims = [
        {
            "id": f"t.py::test_super_beats_random[{model}]",
            "verdict": "holds",
            "key": "r_1",
            "measured": {
                "r_1": {"value": 1e12, "ci": None},
                "delta_ppl_super": {"value": 5.0, "ci": [4.0, 6.0]},
                "delta_ppl_random": {"value": float("nan"), "ci": [float("-inf"), float("inf")]},
            },
            "context": {"model": model, "metric": "m&m", "perturbation": "p#1~2"},
        }
        for model in ("a_b%c", "x{y}z\\w", "ünïcode$")
    ]
    tex = write_reports(claims, {"tier": {"name": "t_1"}}, tmp_path)["tex"].read_text()
    assert check_structure(tex) == 2 and "a\\_b\\%c" in tex and "x\\{y\\}z\\textbackslash{}w" in tex
    _compile(tex, tmp_path)


def _umask_022(monkeypatch) -> None:
    monkeypatch.setattr("esa.util.files.umask", lambda: 0o022)


def test_claim_figures_saved_as_png_pdf_svg(tmp_path, monkeypatch) -> None:
    _umask_022(monkeypatch)
    c = Claim("s").figure(plots.plot_dose_response([1, 2, 4], {"a": [1, 2, 3]}), "dose curve")
    c.figure(b"\x89PNG\r\n\x1a\n-raw", "raw bytes")  # no vector copy to make from bytes
    assert set(c.figures[0]["vector"]) == {"pdf", "svg"} and "vector" not in c.figures[1]
    rec = {"id": "e/t.py::test_f[m-1]", "verdict": "holds", "figures": c.figures}
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "stale-1.png").write_bytes(b"old")
    paths = write_reports([rec], {}, tmp_path)
    files = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert files == ["t-test_f-m-1-1.pdf", "t-test_f-m-1-1.png", "t-test_f-m-1-1.svg", "t-test_f-m-1-2.png"]
    folder = tmp_path / "figures"
    assert (folder / "t-test_f-m-1-1.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (folder / "t-test_f-m-1-1.svg").read_bytes()[:2000]
    for p in [*folder.iterdir(), *paths.values()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "![dose curve](figures/t-test_f-m-1-1.png)" in md and "[PDF](figures/t-test_f-m-1-1.pdf)" in md
    assert 'href="figures/t-test_f-m-1-1.svg"' in html and "base64" not in md
    assert load_claims(paths["json"])["claims"][0]["figures"][0]["vector"]["pdf"]  # self-contained json


def test_save_figure_writes_vector_copies_and_warns_only(tmp_path, monkeypatch) -> None:
    _umask_022(monkeypatch)
    fig = plots.plot_dose_response([1, 2], {"a": [1, 2]})
    png = plots.save_figure(fig, tmp_path / "d.png", also=plots.VECTOR_FORMATS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pdf", "d.png", "d.svg"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in tmp_path.iterdir())
    with pytest.warns(RuntimeWarning, match="not rendered as nope"):
        plots.save_figure(plots.plot_dose_response([1, 2], {"a": [1, 2]}), png, also=("nope",))
    assert png.read_bytes().startswith(b"\x89PNG")


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esa")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def test_esa_report_from_claims_json(tmp_path, capsys) -> None:
    assert main(_cli(str(FIXTURE), "--out-dir", str(tmp_path / "r"), "--standalone")) == 0
    tex = (tmp_path / "r" / "claims_tables.tex").read_text()
    assert tex.startswith("\\documentclass{article}") and "\\usepackage{booktabs}" in tex
    assert {"claims.html", "claims.md", "claims.json"} <= {p.name for p in (tmp_path / "r").iterdir()}
    assert "esa report:" in capsys.readouterr().out
    again = main(_cli(str(tmp_path / "r"), "--compare", str(FIXTURE)))  # a folder works too
    assert again == 0 and "0 changed verdict" in (tmp_path / "r" / "claims.md").read_text()
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.json"):
        main(_cli(str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match=r"--compare .*: no such file"):
        main(_cli(str(FIXTURE), "--out-dir", str(tmp_path / "x"), "--compare", str(tmp_path / "old.json")))
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match=r"neither claims\.json nor results\.json"):
        main(_cli(str(tmp_path / "x")))


def test_esa_report_from_a_run_directory(tmp_path) -> None:
    summary = [
        {
            "metric": "grad_x_weight",
            "perturbation": "zero",
            "condition": c,
            "mean_delta_ppl": v,
            "ci95": [v - 1, v + 1],
        }
        for c, v in (("super", 120.0), ("random_k", 0.5), ("bottom_k", 0.01))
    ]
    (tmp_path / "results.json").write_text(json.dumps({"summary": summary}))
    (tmp_path / "experiment_manifest.json").write_text(json.dumps({"model": {"name": "tiny_llama"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(_cli(str(tmp_path))) == 0
    tex = (tmp_path / "delta_ppl.tex").read_text()
    assert check_structure(tex) == 1 and "tiny\\_llama & grad\\_x\\_weight & zero" in tex
    assert "$\\Delta$PPL random" in tex and "$\\Delta$PPL bottom" in tex
    (tmp_path / "results.json").write_text(json.dumps({"summary": []}))
    with pytest.raises(ConfigError, match="no ΔPPL summary"):
        main(_cli(str(tmp_path / "results.json")))


def test_vector_figures_from_the_standard_tier_on(pytester: pytest.Pytester) -> None:
    """Smoke (CI) keeps PNG only; a tier for papers also writes PDF and SVG."""
    pytester.makepyfile(
        test_fig="""
from esa.plots import plot_dose_response

def test_fig(claim):
    claim("figure").figure(plot_dose_response([1, 2, 4], {"a": [1, 2, 3]}), "dose curve")
"""
    )
    for tier in ("smoke", "standard"):
        pytester.runpytest("--esa-tier", tier, "--esa-report", tier).assert_outcomes(passed=1)
    found = {
        t: sorted(p.suffix for p in (pytester.path / t / "figures").iterdir()) for t in ("smoke", "standard")
    }
    assert found == {"smoke": [".png"], "standard": [".pdf", ".png", ".svg"]}
