"""``esa run`` with the old runner's options (issue 13): the generated out-dir, and each analysis
flag writing its artifacts (esa.runbook.extras, esa.runbook.extras_io)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import esa.runbook.extras
from esa.cli import main
from esa.models import load_model
from esa.runbook.config import ExperimentConfig, default_out_dir

ROOT = Path(__file__).resolve().parents[1]
PIQA = ROOT / "fixtures" / "zeroshot" / "sample_piqa.jsonl"
TINY = [
    "--max-length",
    "16",
    "--max-samples",
    "2",
    "--batch-size",
    "2",
    "--no-progress",
    "--data-file",
    "builtin",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_out_dir_names_the_run_and_never_overwrites(tmp_path):
    config = ExperimentConfig(
        model="meta-llama/Llama-3.1-8B", metrics=["grad_x_weight", "act_mag"], mode="global", topk=300
    )
    first = default_out_dir(config, tmp_path)
    assert first == tmp_path / "Llama-3.1-8B" / "grad_x_weight+act_mag_global_k300_sign_flip"
    first.mkdir(parents=True)
    second = default_out_dir(config, tmp_path)
    assert second.name == first.name + "-2"
    second.mkdir()
    assert default_out_dir(config, tmp_path).name == first.name + "-3"
    config.perturbations = []
    assert default_out_dir(config, tmp_path).name == "grad_x_weight+act_mag_global_k300"


def test_run_without_out_dir_writes_a_fresh_generated_dir(tmp_path, capsys):
    argv = [
        "run",
        "--model",
        "tiny-llama",
        *TINY,
        "--topk",
        "3",
        "--perturb",
        "zero",
        "--controls",
        "random_k",
    ]
    code, out1, err = run_cli(argv, capsys)
    assert code == 0, err
    code, out2, err = run_cli(argv, capsys)
    assert code == 0, err
    base = tmp_path / "outputs" / "esa" / "tiny-llama" / "grad_x_weight_per_layer_k3_zero"
    assert out1.strip().endswith(f"artifacts in {base}")
    assert out2.strip().endswith(f"artifacts in {base}-2")
    assert (base / "results.json").is_file() and (base.with_name(base.name + "-2") / "results.json").is_file()


def test_old_runner_flags_write_their_analyses(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "-m", "tiny-mixtral", *TINY, "--metric", "grad_x_weight,magnitude", "--topk", "4"]
    argv += ["--seeds", "0", "--perturb", "zero", "--controls", "random_k", "--out-dir", str(out)]
    argv += ["--architecture-analysis", "--weight-analysis", "--n-clusters", "3", "--export-stats"]
    argv += ["--export-topk-csv", "--downstream-tasks", "--tasks", str(PIQA), "--task-samples", "3"]
    argv += ["--advanced-perturbations", "quantization", "magnitude_scaling", "--bits", "3", "--scale", "4"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    lm = load_model("tiny-mixtral")
    names = lm.param_map.scorable()
    arch = pd.read_csv(out / "architecture_grad_x_weight.csv")
    assert math.isclose(arch["share"].sum(), 1.0) and math.isclose(arch["param_share"].sum(), 1.0)
    assert arch["entries"].sum() == sum(lm.param_map[n].numel for n in names)
    enriched = arch[arch["param_share"] > 0]
    assert (enriched["enrichment"] - enriched["share"] / enriched["param_share"]).abs().max() < 1e-12
    assert (out / "architecture_experts_grad_x_weight.csv").is_file()  # MoE: per expert
    analyses = json.loads((out / "analyses.json").read_text())
    assert math.isclose(sum(analyses["architecture"]["magnitude"]["params"].values()), 1.0)
    clusters = pd.read_csv(out / "clusters_magnitude.csv")
    assert len(clusters) == 4 * len(names) == analyses["weight_analysis"]["magnitude"]["n_samples"]
    assert clusters["cluster"].nunique() == analyses["weight_analysis"]["magnitude"]["n_clusters"] <= 3
    assert {c["on_topk_of"] for c in analyses["metric_correlations"]} == {"grad_x_weight", "magnitude"}
    assert all(-1.0 <= c["rho"] <= 1.0 for c in analyses["metric_correlations"])
    stats = pd.read_csv(out / "score_stats.csv")
    assert len(stats) == 2 * len(names) and set(stats["tensor"]) == set(names)
    results = json.loads((out / "results.json").read_text())
    methods = {r["perturbation"] for r in results["rows"]}
    assert methods == {"zero", "quantization", "magnitude_scaling"}
    assert all(r["restored_bit_exact"] and 0.0 <= r["acc_sample_piqa"] <= 1.0 for r in results["rows"])
    options = json.loads((out / "experiment_manifest.json").read_text())["perturbation_options"]
    assert options["quantization"]["scale"] == 3 and options["magnitude_scaling"]["scale"] == 4.0
    down = pd.read_csv(out / "downstream.csv")
    assert set(down["n_examples"]) == {3} and len(down) == 2 * 3 * 2  # metrics x methods x conditions
    assert (down["delta_acc"] - (down["acc"] - down["acc_baseline"])).abs().max() < 1e-12
    assert "architecture grad_x_weight: top-k" in stdout and "downstream sample_piqa" in stdout


def _checkpoint_dir(tmp_path: Path, name: str, noise: float) -> str:
    """tiny-pythia saved as a local directory, its weights plus N(0, noise²) (0: identical)."""
    lm = load_model("tiny-pythia")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in lm.model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    path = tmp_path / name
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def test_temporal_stability_across_seeds_and_checkpoints(tmp_path, capsys):
    same, moved = _checkpoint_dir(tmp_path, "ckpt-same", 0.0), _checkpoint_dir(tmp_path, "ckpt-moved", 0.5)
    capsys.readouterr()
    out = tmp_path / "out"
    argv = [
        "run",
        "--model",
        "tiny-pythia",
        *TINY,
        "--topk",
        "5",
        "--perturb",
        "zero",
        "--controls",
        "random_k",
    ]
    argv += [
        "--seeds",
        "0,1",
        "--temporal-stability",
        "--checkpoints",
        f"{moved},{same}",
        "--out-dir",
        str(out),
    ]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    temporal = json.loads((out / "analyses.json").read_text())["temporal_stability"]
    assert temporal["conditions"]["names"] == ["grad_x_weight/seed0", "grad_x_weight/seed1"]
    ckpt = temporal["checkpoints"]
    assert ckpt["checkpoints"] == [moved, same, "tiny-pythia"]
    jac = ckpt["stability"]["jaccard"]
    assert jac[1][2] == 1.0  # the same weights on the same windows: the same top-k
    assert jac[0][2] < 1.0  # moved weights: another top-k
    assert [c["to"] for c in ckpt["stability"]["consecutive"]] == [same, "tiny-pythia"]
    assert "super_weight" in ckpt and "temporal stability over 3 checkpoints" in stdout


def test_a_missing_analysis_refuses_its_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(esa.runbook.extras, "temporal", None)
    out = tmp_path / "out"
    argv = [
        "run",
        "--model",
        "tiny-llama",
        *TINY,
        "--topk",
        "3",
        "--temporal-stability",
        "--out-dir",
        str(out),
    ]
    code, _, err = run_cli(argv, capsys)
    assert (
        code == 2
        and err.strip()
        == "esa: error: --temporal-stability is not implemented in this checkout: drop the flag"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--clustering-method", "ward"], "--clustering-method"),
        (["--n-clusters", "0"], "--n-clusters"),
        (["--task-samples", "0"], "--task-samples"),
        (["--advanced-perturbations", "quantization", "--bits", "1"], "--bits"),
        (["--scale", "0"], "--scale"),
        (["--noise-sigma", "-1"], "--noise-sigma"),
        (["--advanced-perturbations", "noise"], "unknown advanced perturbation"),
        (["--checkpoints", "tiny-llama"], "--temporal-stability"),
    ],
)
def test_bad_old_runner_options_get_one_line(extra, needle, tmp_path, capsys):
    argv = ["run", "--model", "tiny-llama", *TINY, "--topk", "3", *extra]
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("esa: error: ") and needle in lines[0], err
    assert not (tmp_path / "outputs").exists()


def test_vector_plots_write_pdf_and_svg_next_to_each_png(tmp_path, capsys):
    argv = [
        "run",
        "--model",
        "tiny-llama",
        *TINY,
        "--topk",
        "3",
        "--perturb",
        "zero",
        "--controls",
        "random_k",
    ]
    code, _, err = run_cli([*argv, "--save-plots", "--vector-plots", "--out-dir", "vec"], capsys)
    assert code == 0, err
    pngs = sorted((tmp_path / "vec" / "plots").glob("*.png"))
    assert pngs
    for png in pngs:
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
        assert b"<svg" in png.with_suffix(".svg").read_bytes()[:2000]
    code, _, err = run_cli([*argv, "--save-plots", "--out-dir", "png"], capsys)
    assert code == 0 and not list((tmp_path / "png" / "plots").glob("*.pdf"))
