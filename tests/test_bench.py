"""Tests for esa.bench (CPU smoke run on tiny models), esa.models.archs (exact published configs,
random-init builds, random-id windows) and the speed paths they exercise (checkpointed and lean
scoring, evaluation reuse in the runbook). GPU tests are marked ``gpu`` (skipped without CUDA)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from esa.bench import main
from esa.bench.baselines import plain_eval
from esa.bench.markdown import markdown
from esa.bench.sections import compiled_sees_perturbation
from esa.data import random_data, random_windows
from esa.evaluate import auto_batch_size, evaluate
from esa.metrics.registry import compute_scores
from esa.models import archs, load_model
from esa.util.runtime import worker_gpu

PUBLISHED_PARAMS = {  # parameter counts of the published checkpoints
    "pythia-1.4b": 1_414_647_808,
    "llama-3.1-8b": 8_030_261_248,
    "mixtral-8x7b": 46_702_792_704,
}


def _small(arch: str):
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    values = archs.CONFIGS[arch][1]
    if "num_key_value_heads" in values:
        kw["num_key_value_heads"] = 4 if values["num_key_value_heads"] == values["num_attention_heads"] else 2
    if "head_dim" in values:
        kw["head_dim"] = 16
    return archs.make_config(arch, **kw)


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
def test_arch_configs_have_the_published_size(arch):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(archs.make_config(arch))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[arch]


def test_archs_are_registered():
    from esa.models import list_models

    names = {r["name"]: r["source"] for r in list_models()}
    for arch in archs.CONFIGS:
        assert names[f"arch-{arch}"] == "arch"


@pytest.mark.parametrize("arch", list(archs.CONFIGS))
def test_build_random_is_seeded_and_matches_transformers_loss(arch):
    config = _small(arch)
    a = archs.build_random(config, dtype=torch.float32, device="cpu", seed=3)
    b = archs.build_random(config, dtype=torch.float32, device="cpu", seed=3)
    c = archs.build_random(config, dtype=torch.float32, device="cpu", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in a.parameters())
    assert not any(p.is_meta for p in a.parameters()) and not any(t.is_meta for t in a.buffers())
    windows = random_windows(3, 16, config.vocab_size, seed=1)
    res = evaluate(a, windows, batch_size=2, progress=False)
    with torch.no_grad():
        ref = float(a(windows, labels=windows, use_cache=False).loss)
    assert res.nll == pytest.approx(ref, rel=1e-4)


def test_random_windows_and_data():
    w = random_windows(5, 7, 50304, seed=0)
    assert w.shape == (5, 7) and w.dtype == torch.long and int(w.min()) >= 0 and int(w.max()) < 50304
    assert torch.equal(w, random_windows(5, 7, 50304, seed=0))
    data = random_data(1000, n_eval=4, n_calib=6, length=8, seed=1)
    assert data.eval_ids.shape == (4, 8) and data.calib_pool.shape == (6, 8)
    assert data.calibration(3, seed=0).shape == (3, 8)
    assert data.manifest()["max_length"] == 8


def test_layer_device_map_covers_every_tensor():
    model = archs.build_random(_small("llama-3.1-8b"), dtype=torch.float32, device="cpu")
    devs = [torch.device("cpu"), torch.device("meta")]  # two "devices" only to check the split
    placement = archs.layer_device_map(model, devs)
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        archs._device_of(name, placement)  # raises if a tensor has no device
    assert placement["model.layers.0"] == devs[0] and placement["model.layers.1"] == devs[1]
    assert placement["model.embed_tokens"] == devs[0] and placement["lm_head"] == devs[1]


def test_auto_batch_size_on_cpu_is_the_fallback():
    model = archs.build_random(_small("pythia-1.4b"), dtype=torch.float32, device="cpu")
    assert auto_batch_size(model, 200, 512, fallback=8) == 8


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_checkpointed_and_lean_scoring_match(name):
    lm = load_model(name, device="cpu")
    calib = random_windows(4, 24, lm.model.config.vocab_size, seed=0)
    for metric in ("grad_x_weight", "grad_squared"):
        plain = compute_scores(lm, metric, calib, batch_size=2, progress=False, checkpoint=False)
        ckpt = compute_scores(lm, metric, calib, batch_size=2, progress=False, checkpoint=True)
        lean = compute_scores(lm, metric, calib, batch_size=2, progress=False, score_dtype=torch.bfloat16)
        for n in plain:
            torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-12)
            assert lean[n].dtype == torch.bfloat16
            scale = float(plain[n].abs().max()) + 1e-30
            assert float((lean[n].float() - plain[n]).abs().max()) / scale < 0.02
    assert all(p.grad is None for p in lm.model.parameters())


def test_runbook_reuses_identical_evaluations():
    from esa.runbook.experiment import ExperimentConfig, run_experiment

    lm = load_model("tiny-llama", device="cpu")
    data = random_data(lm.model.config.vocab_size, 3, 12, 16, seed=0)
    common = dict(
        model="tiny-llama",
        metrics=["magnitude", "grad_x_weight"],
        seeds=[0, 1],
        topk=4,
        perturbations=["sign_flip", "gauss_noise"],
        progress=False,
        use_cache=False,
        device="cpu",
        max_samples=3,
        max_length=16,
        calib_samples=4,
    )
    fast = run_experiment(ExperimentConfig(**common), lm=lm, data=data)
    slow = run_experiment(ExperimentConfig(**common, reuse_evals=False), lm=lm, data=data)
    assert fast.timings["evals_reused"] > 0 and slow.timings["evals_reused"] == 0
    for a, b in zip(fast.rows, slow.rows):
        assert (a["metric"], a["perturbation"], a["condition"], a["seed"]) == (
            b["metric"],
            b["perturbation"],
            b["condition"],
            b["seed"],
        )
        assert a["ppl"] == b["ppl"] and a["n_changed"] == b["n_changed"]
    assert set(fast.memory) >= {"load", "baseline"}


def test_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--sections",
            "env,eval,score,hutchinson,select,perturb,runbook",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--length",
            "16",
            "--repeats",
            "1",
            "--eval-archs",
            "tiny-llama",
            "--eval-windows",
            "4",
            "--score-archs",
            "tiny-llama",
            "--calib-windows",
            "4",
            "--score-batch",
            "2",
            "--hutchinson-archs",
            "tiny-llama",
            "--hutchinson-windows",
            "1",
            "--select-arch",
            "tiny-llama",
            "--runbook-arch",
            "tiny-llama",
            "--runbook-windows",
            "3",
            "--runbook-calib",
            "2",
            "--runbook-metrics",
            "magnitude,grad_x_weight",
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    sections = results["sections"]
    for name in ("eval", "score", "hutchinson", "select", "perturb", "runbook"):
        assert sections[name]["errors"] == [], (name, sections[name]["errors"])
        assert sections[name]["rows"], name
    row = sections["eval"]["rows"][0]
    assert row["plain_tok_s"] > 0 and row["esa_tok_s"] > 0 and row["nll_abs_diff"] < 1e-3
    assert all(r["verified"] for r in sections["perturb"]["rows"])
    assert {(r["mode"], r["k"]) for r in sections["select"]["rows"]} >= {("global", 100), ("per_layer", 300)}
    assert sections["runbook"]["rows"][0]["conditions"] == 2 * 3 * 4 * 3
    text = markdown(results)
    assert "Evaluation forward" in text and "Runbook v2" in text


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_arch_builds_on_cuda_in_bf16_and_matches_plain_loss():
    lm = load_model("arch-pythia-1.4b", device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in lm.model.parameters())
    windows = random_windows(4, 128, lm.model.config.vocab_size, seed=0)
    res = evaluate(lm.model, windows, batch_size=4, progress=False)
    plain = plain_eval(lm.model, windows, 4)
    assert abs(res.nll - plain) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rep", range(4))
def test_xdist_worker_gets_its_own_gpu(rep):
    """``pytest -n <#GPUs>``: worker gwN loads its models on cuda:(N mod #GPUs)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = torch.cuda.device_count()
    expected = (
        int(worker[2:]) % count if worker.startswith("gw") and count > 1 else torch.cuda.current_device()
    )
    assert worker_gpu() == expected
    lm = load_model("tiny-llama")
    assert next(lm.model.parameters()).device == torch.device(f"cuda:{expected}")
    print(f"worker {worker or 'main'} -> cuda:{expected} of {count}")


@pytest.mark.gpu
def test_device_map_splits_over_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    config = _small("mixtral-8x7b")
    config.num_hidden_layers = 4
    model = archs.build_random(config, dtype=torch.bfloat16, device_map="auto")
    devices = {p.device.index for p in model.parameters()}
    assert devices == {0, 1}
    from esa.models import from_module

    lm = from_module("split", model, None, "arch")
    windows = random_windows(2, 32, config.vocab_size)
    res = evaluate(model, windows, 2, progress=False)
    plain = plain_eval(model, windows, 2)
    assert abs(res.nll - plain) < 2e-2
    scores = compute_scores(lm, "grad_x_weight", windows, batch_size=1, progress=False)
    named = dict(model.named_parameters())
    assert all(s.device == named[n].device and torch.isfinite(s).all() for n, s in scores.items())


@pytest.mark.gpu
def test_compiled_evaluation_sees_in_place_perturbations():
    lm = load_model("arch-pythia-1.4b", device="cuda")
    windows = random_windows(8, 128, lm.model.config.vocab_size, seed=0)
    check = compiled_sees_perturbation(lm, windows, 8)
    assert check["ok"], check
