"""The esa CLI: end-to-end artifacts on a tiny model, and every bad input's one-line error."""

import json
import math
import stat

import pandas as pd
import pytest
import torch

from esa.cli import main
from esa.models.tiny import tiny_models
from esa.util.files import umask

TINY = [
    "--model",
    "tiny-llama",
    "--max-length",
    "32",
    "--max-samples",
    "2",
    "--batch-size",
    "2",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        [
            "run",
            *TINY,
            "--metric",
            "grad_x_weight",
            "--mode",
            "per_layer",
            "--topk",
            "5",
            "--perturb",
            "sign_flip",
            "--controls",
            "random_k,bottom_k",
            "--seeds",
            "0,1",
            "--stability-check",
            "--save-plots",
            "--out-dir",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {
        "experiment_manifest.json",
        "config.json",
        "top_weights.csv",
        "results.csv",
        "results.json",
        "stability.json",
        "plots",
    } <= names
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(r["condition"], r["seed"]) for r in rows} == {
        (c, s) for c in ("super", "random_k", "bottom_k") for s in (0, 1)
    }
    base = results["baseline"]["ppl"]
    for r in rows:
        assert r["restored_bit_exact"] is True
        assert math.isclose(r["delta_ppl"], r["ppl"] - base, rel_tol=1e-9, abs_tol=1e-9)
    top = pd.read_csv(out / "top_weights.csv")
    assert {"tensor", "layer", "component", "row", "col", "score", "rank", "metric", "seed"} <= set(
        top.columns
    )
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["seeds"] == [0, 1] and manifest["data"]["eval"]["windows_used"] == 2
    assert "sha256" in manifest["data"]["eval"] and manifest["environment"]["torch"]
    stab = json.loads((out / "stability.json").read_text())["metrics"]["grad_x_weight"]
    assert 0.0 <= stab["mean_jaccard"] <= 1.0 and len(stab["pairs"]) == 1
    assert sorted(p.name for p in (out / "plots").iterdir())  # PNGs written
    assert "baseline: PPL" in stdout and "super" in stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()  # not mkdtemp's 0700
    assert not list(tmp_path.glob(".out.tmp-*"))  # staging dir moved into place


def test_scores_are_cached_and_reused(tmp_path, capsys, monkeypatch):
    args = ["run", *TINY, "--topk", "3", "--perturb", "zero", "--controls", "random_k", "--seeds", "0"]
    assert run_cli([*args, "--out-dir", str(tmp_path / "a")], capsys)[0] == 0
    cached = list((tmp_path / "cache" / "scores").glob("*.safetensors"))
    assert len(cached) == 1

    import esa.metrics.registry

    def fail(*a, **k):
        raise AssertionError("scores should come from the cache")

    monkeypatch.setattr(esa.metrics.registry, "compute_scores", fail)
    assert run_cli([*args, "--perturb", "sign_flip", "--out-dir", str(tmp_path / "b")], capsys)[0] == 0
    a = pd.read_csv(tmp_path / "a" / "top_weights.csv")
    b = pd.read_csv(tmp_path / "b" / "top_weights.csv")
    assert a[["tensor", "flat_index"]].equals(b[["tensor", "flat_index"]])


def test_corrupt_cache_is_recomputed(tmp_path, capsys):
    args = ["run", *TINY, "--topk", "3", "--perturb", "zero", "--controls", "random_k", "--seeds", "0"]
    assert run_cli([*args, "--out-dir", str(tmp_path / "a")], capsys)[0] == 0
    (cached,) = (tmp_path / "cache" / "scores").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    assert run_cli([*args, "--out-dir", str(tmp_path / "b")], capsys)[0] == 0
    a = pd.read_csv(tmp_path / "a" / "top_weights.csv")
    b = pd.read_csv(tmp_path / "b" / "top_weights.csv")
    assert a.equals(b)
    assert cached.stat().st_size > 100  # rewritten


def test_eval_prints_json(capsys):
    code, stdout, err = run_cli(["eval", *TINY], capsys)
    assert code == 0, err
    data = json.loads(stdout)
    assert data["n_tokens"] == 2 * 31 and data["perplexity"] > 1.5 and data["data"]["windows_used"] == 2


def test_models_lists_registry(capsys):
    code, stdout, _ = run_cli(["models"], capsys)
    assert code == 0
    for name in (*tiny_models(), "smollm2-135m", "pythia-1.4b", "llama-3.1-8b"):
        assert name in stdout


def _nan_model_dir(tmp_path):
    from esa.models import load_model

    lm = load_model("tiny-llama")
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan-model"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


BAD = {
    "unknown model": (["--model", "no-such-model"], "esa models"),
    "unknown metric": (["--metric", "nope"], "unknown metric"),
    "k zero": (["--topk", "0"], "--topk"),
    "k too large": (["--topk", "100000"], "larger than tensor"),
    "negative scale": (["--perturb", "gauss_noise", "--perturb-scale", "-1"], "--perturb-scale"),
    "prob above one": (["--perturb-prob", "1.5"], "--perturb-prob"),
    "prob below zero": (["--perturb-prob", "-0.1"], "--perturb-prob"),
    "empty data": (["--data-file", "EMPTY"], "empty"),
    "short data": (["--data-file", "SHORT"], "--max-length"),
    "missing data": (["--data-file", "MISSING"], "not found"),
    "bad seeds": (["--seeds", "a,b"], "comma-separated"),
    "calibration overlap": (["--calib-samples", "100000"], "--calib-samples"),
    "bad bit name": (["--perturb", "bit_flip", "--perturb-bit", "exponent"], "--perturb-bit"),
    "bit out of range": (["--perturb", "bit_flip", "--perturb-bit", "40"], "0..31"),
    "identity scale": (["--perturb", "scale", "--perturb-scale", "1"], "changes no weight"),
    "nan weights": (["--model", "NANMODEL"], "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error(case, tmp_path, capsys):
    extra, needle = BAD[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A short text.")
    subst = {
        "EMPTY": str(tmp_path / "empty.txt"),
        "SHORT": str(tmp_path / "short.txt"),
        "MISSING": str(tmp_path / "missing.txt"),
    }
    if "NANMODEL" in extra:
        subst["NANMODEL"] = _nan_model_dir(tmp_path)
        capsys.readouterr()  # drop save_pretrained's own output
    extra = [subst.get(a, a) for a in extra]
    options = {
        "--model": "tiny-llama",
        "--max-length": "32",
        "--max-samples": "2",
        "--batch-size": "2",
        "--topk": "3",
        "--seeds": "0",
    }
    options.update(zip(extra[::2], extra[1::2]))
    argv = ["run", "--no-progress", *[x for kv in options.items() for x in kv]]
    out = tmp_path / "out"
    code, _, err = run_cli([*argv, "--out-dir", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esa: error: ") and needle in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_existing_results_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "run",
        *TINY,
        "--topk",
        "3",
        "--perturb",
        "zero",
        "--controls",
        "random_k",
        "--seeds",
        "0",
        "--out-dir",
        str(out),
    ]
    assert run_cli(args, capsys)[0] == 0
    before = (out / "results.json").read_text()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "results.json").read_text() == before
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["run", *TINY, "--topk", "3", "--out-dir", str(blocker / "sub")], capsys)
    assert code == 2 and "--out-dir" in err and len(err.strip().splitlines()) == 1


def test_failure_midway_leaves_no_out_dir(tmp_path, capsys, monkeypatch):
    from esa.runbook import experiment

    calls = {"n": 0}
    real = experiment.evaluate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(experiment, "evaluate", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        main(["run", *TINY, "--topk", "3", "--perturb", "zero", "--seeds", "0", "--out-dir", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _write_shared_data(root):
    """A project dir beside a fake ../shared/data with small WikiText-like test/valid files."""
    from esa.models.tokenizer import builtin_corpus

    corpus = builtin_corpus()
    files = {"wikitext-2-raw/wiki.test.raw": corpus[:20_000], "wikitext-2/valid.txt": corpus[30_000:60_000]}
    for rel, text in files.items():
        path = root / "shared" / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "project").mkdir()
    return root / "project"


def test_data_defaults_to_the_shared_wikitext_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(_write_shared_data(tmp_path))
    out = tmp_path / "out"
    args = ["run", *TINY, "--topk", "3", "--perturb", "zero", "--seeds", "0,1", "--out-dir", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    data = json.loads((out / "experiment_manifest.json").read_text())["data"]
    assert data["eval"]["path"] == str((tmp_path / "shared/data/wikitext-2-raw/wiki.test.raw").resolve())
    assert data["calibration"]["path"] == str((tmp_path / "shared/data/wikitext-2/valid.txt").resolve())
    assert data["calibration_disjoint"] is True and data["calibration"]["from"] == "a separate text"
    assert "data: eval wiki.test.raw, calibration valid.txt (disjoint from eval)" in stdout
    code, stdout, err = run_cli(["eval", *TINY], capsys)
    assert code == 0 and json.loads(stdout)["data"]["name"] == "wiki.test.raw", err


def test_without_shared_data_the_builtin_corpus_is_used(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["run", *TINY, "--topk", "3", "--perturb", "zero", "--controls", "random_k", "--out-dir", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    data = json.loads((out / "experiment_manifest.json").read_text())["data"]
    assert data["eval"]["path"] is None and data["calibration"]["from"] == "windows after the evaluation ones"
    assert data["calibration_disjoint"] is True and "calibration windows after the evaluation ones" in stdout


def _zeros_model_dir(tmp_path):
    """tiny-llama with the first half of every 2-D weight set to exact zeros (as after 4-bit)."""
    from esa.models import load_model

    lm = load_model("tiny-llama")
    zeros = 0
    with torch.no_grad():
        for name in lm.param_map.scorable():
            w = dict(lm.model.named_parameters())[name].view(-1)
            w[: w.numel() // 2] = 0.0
            zeros += w.numel() // 2
    path = tmp_path / "zeros-model"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path), zeros


def test_controls_are_drawn_among_changed_weights(tmp_path, capsys, monkeypatch):
    model, zeros = _zeros_model_dir(tmp_path)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = [*TINY, "--model", model, "--topk", "3", "--perturb", "zero,bit_flip", "--seeds", "0,1"]
    code, _, err = run_cli(["run", *args, "--perturb-bit", "exponent_lsb", "--out-dir", str(out)], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        if r["perturbation"] == "zero" and r["condition"] != "super":
            assert r["n_excluded"] == zeros and r["n_changed"] == r["n_weights"] > 0, r
        if r["perturbation"] == "bit_flip":
            assert r["n_excluded"] == 0 and r["prob"] == 0.05 and r["bit"] == "exponent_lsb", r
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["controls_excluded"] == {
        "zero": {"random_k": zeros, "bottom_k": zeros},
        "bit_flip": {"random_k": 0, "bottom_k": 0},
    }
    assert manifest["perturbation_options"]["bit_flip"] == {
        "scale": None,
        "prob": 0.05,
        "bit": "exponent_lsb",
    }
    assert manifest["perturbation_options"]["zero"]["prob"] == 1.0
    overlap = manifest["calibration_overlap"]
    assert overlap["seeds"] == [0, 1] and overlap["n"] == 2 and overlap["mean_jaccard"] < 1.0


def test_help_states_the_registry_defaults():
    from esa.cli import build_parser
    from esa.perturb import PERTURBATIONS

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {a.dest: a.help for a in run._actions}
    assert f"default {PERTURBATIONS['gauss_noise'].default_scale}" in helps["perturb_scale"]
    assert f"default {PERTURBATIONS['bit_flip'].default_prob} for bit_flip" in helps["perturb_prob"]
    assert "exponent_lsb" in helps["perturb_bit"] and "valid.txt" in helps["calib_file"]
