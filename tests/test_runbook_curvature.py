"""The runbook with all six metrics: curvature metrics on fewer calibration windows
(``--curvature-calib-samples``), the exact hessian_diag on the tensors ``--hessian-tensors`` names,
both recorded in the manifest; per_layer and global runs sharing the cached scores; bad settings
refused before the baseline. Tiny random-init Llama on the CPU."""

import json

import pytest
import torch

import esa.metrics.registry
import esa.runbook.experiment
from esa.cli import build_parser
from esa.data import random_data
from esa.errors import ConfigError
from esa.models import load_model
from esa.runbook import ExperimentConfig, run_experiment

SIX = ["magnitude", "act_mag", "grad_x_weight", "grad_squared", "hutchinson_diag", "hessian_diag"]
FINAL_NORM = r"^model\.norm\.weight$"


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_model("tiny-llama", dtype="fp32", device="cpu")


@pytest.fixture
def data(lm):
    return random_data(int(lm.model.config.vocab_size), 3, 8, 16, seed=1)


def _config(tmp_path, mode="per_layer", **kw):
    options = dict(
        model="tiny-llama",
        out_dir=str(tmp_path / mode),
        metrics=list(SIX),
        mode=mode,
        topk=4,
        max_samples=3,
        max_length=16,
        batch_size=2,
        calib_samples=4,
        curvature_calib_samples=1,
        hessian_tensors=FINAL_NORM,
        hutchinson_samples=2,
        seeds=[0, 1],
        perturbations=["sign_flip", "bit_flip"],
        controls=["random_k", "bottom_k"],
        progress=False,
        cache_root=str(tmp_path / "cache"),
    )
    options.update(kw)
    return ExperimentConfig(**options)


def test_six_metrics_per_layer_then_global_from_the_cache(lm, data, tmp_path, monkeypatch):
    calls = []
    compute = esa.metrics.registry.compute_scores

    def spy(lm_, metric, calib, **kw):
        calls.append((metric, int(calib.shape[0]), tuple(kw["names"])))
        limits.add(kw["memory_limit"])
        return compute(lm_, metric, calib, **kw)

    limits: set = set()
    monkeypatch.setattr(esa.metrics.registry, "compute_scores", spy)
    res = run_experiment(_config(tmp_path, memory_limit=64.0), lm=lm, data=data)
    assert limits == {64 * 2**30}  # --memory-limit reaches every scoring pass, in bytes
    windows = {m: n for m, n, _ in calls}
    assert windows == {m: 1 if m in ("hutchinson_diag", "hessian_diag") else 4 for m in SIX}
    assert {names for m, _, names in calls if m == "hessian_diag"} == {("model.norm.weight",)}
    assert len(calls) == len(SIX) * 2  # every (metric, seed) scored once
    assert len(res.rows) == len(SIX) * 2 * 3 * 2  # metrics x perturbations x conditions x seeds
    for row in res.rows:
        assert row["restored_bit_exact"] and row["mode"] == "per_layer"
    for (metric, _seed), sel in res.selections.items():
        tensors = {n for n, idx in sel.indices.items() if idx.numel()}
        assert (
            tensors == {"model.norm.weight"}
            if metric == "hessian_diag"
            else "model.norm.weight" not in tensors
        )
    manifest = json.loads((res.out_dir / "experiment_manifest.json").read_text())
    curv = manifest["curvature"]
    assert (
        curv["calib_windows"] == 1 and curv["calib_tokens"] == 16 and curv["first_order_calib_windows"] == 4
    )
    assert curv["hutchinson_samples"] == 2
    assert curv["hessian_tensors"] == {
        "pattern": FINAL_NORM,
        "names": ["model.norm.weight"],
        "entries": 64,
        "max_entries": 20_000,
    }
    config = json.loads((res.out_dir / "config.json").read_text())
    assert config["curvature_calib_samples"] == 1 and config["hessian_tensors"] == FINAL_NORM

    calls.clear()
    glob = run_experiment(_config(tmp_path, mode="global"), lm=lm, data=data)
    assert calls == []  # the global run selects from the per_layer run's cached scores
    assert {r["mode"] for r in glob.rows} == {"global"} and len(glob.rows) == len(res.rows)
    sel = glob.selections[("hessian_diag", 0)]
    assert sel.size == 4 and set(sel.indices) == {"model.norm.weight"}


def test_hessian_diag_on_every_tensor_is_refused_before_the_baseline(lm, data, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("no evaluation before the settings are checked")

    monkeypatch.setattr(esa.runbook.experiment, "evaluate", fail)
    with pytest.raises(ConfigError, match="--hessian-tensors"):
        run_experiment(_config(tmp_path, hessian_tensors=None), lm=lm, data=data)
    with pytest.raises(ConfigError, match="matches no parameter"):
        run_experiment(_config(tmp_path, hessian_tensors=r"^nothing$"), lm=lm, data=data)
    with pytest.raises(ConfigError, match="20000"):  # every weight matrix
        run_experiment(_config(tmp_path, hessian_tensors=r"_proj\."), lm=lm, data=data)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"curvature_calib_samples": 5}, "exceeds the 4 calibration windows"),
        ({"curvature_calib_samples": 0}, "positive integer"),
        ({"metrics": ["hutchinson_diag"]}, "add it to --metric"),
        ({"hessian_tensors": "(unclosed"}, "no regex"),
        ({"memory_limit": 0.0}, "--memory-limit must be a positive number of GiB"),
    ],
)
def test_bad_curvature_settings(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **options).validate()


def test_windows_per_metric_and_cli_flags(tmp_path):
    config = _config(tmp_path, curvature_calib_samples=None, calib_samples=None)
    assert [config.windows_for(m) for m in ("act_mag", "hutchinson_diag")] == [3, 3]
    config = _config(tmp_path)
    assert [config.windows_for(m) for m in ("grad_squared", "hessian_diag")] == [4, 1]
    args = build_parser().parse_args(
        ["run", "--model", "tiny-llama", "--curvature-calib-samples", "2", "--hessian-tensors", FINAL_NORM]
    )
    assert (args.curvature_calib_samples, args.hessian_tensors, args.hutchinson_samples) == (2, FINAL_NORM, 8)
    assert args.memory_limit is None
    assert (
        build_parser().parse_args(["run", "--model", "tiny-llama", "--memory-limit", "5.5"]).memory_limit
        == 5.5
    )


def test_controls_skip_masks_only_when_every_entry_changes(lm, tmp_path):
    from esa.runbook.experiment import _eligible

    names = lm.param_map.scorable()
    config = _config(tmp_path)
    assert _eligible(lm, "bit_flip", names, config, {}) is None  # flips every entry
    zeros = bool(any((lm.model.get_parameter(n) == 0).any() for n in names))
    masks = _eligible(lm, "sign_flip", names, config, {})
    assert (masks is not None) == zeros
    w = lm.model.get_parameter(names[0])
    saved = w.detach()[0, 0].clone()
    with torch.no_grad():
        w[0, 0] = 0.0
    try:
        masks = _eligible(lm, "sign_flip", names, config, {})
        assert masks is not None and not bool(masks[names[0]][0, 0])
    finally:
        with torch.no_grad():
            w[0, 0] = saved
