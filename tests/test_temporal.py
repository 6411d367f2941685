"""Tests for esa.analyses.temporal: the stability matrix of named selections, when a super weight
appears over checkpoints, checkpoint specs (hub revisions, offline), and the whole pass over the
checkpoints of a tiny GPT-NeoX trained here for a few seconds."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.analyses.detect_report import LayerActivation, SuperWeight, SuperWeightReport
from esa.analyses.temporal import (
    PYTHIA_STEPS,
    load_checkpoint,
    pythia_checkpoints,
    split_spec,
    stability_matrix,
    super_weight_appearance,
    temporal_stability,
)
from esa.data import make_windows
from esa.errors import ConfigError, ModelError
from esa.models.tokenizer import builtin_corpus, builtin_tokenizer
from esa.select import Selection

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "train_scaling_family.py"
SAVE_AT = (0, 10, 30)  # optimizer steps after which a checkpoint is saved


def _sel(entries) -> Selection:
    """A top selection of (tensor, flat index) entries."""
    idx: dict[str, list[int]] = {}
    for name, flat in entries:
        idx.setdefault(name, []).append(flat)
    indices = {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in idx.items()}
    values = {n: torch.ones(len(v)) for n, v in indices.items()}
    return Selection("top", "global", sum(len(v) for v in idx.values()), 0, "m", indices, values)


def _candidate(name: str, flat: int, act: float) -> SuperWeight:
    return SuperWeight(1, name, name, flat // 8, flat % 8, None, flat, 0.5, 60.0, act, 0)


def _report(*candidates: SuperWeight) -> SuperWeightReport:
    layer = LayerActivation(1, "m", 60.0, 0, 0, 100.0, 0, 0, spike=bool(candidates))
    return SuperWeightReport(None, 4, 50.0, 10.0, 1.0, 1.0, [layer], list(candidates))


def test_stability_matrix_is_the_pairwise_jaccard():
    a = _sel([("w", i) for i in range(4)])
    b = _sel([("w", i) for i in range(2, 6)])
    c = _sel([("v", 0), ("v", 1)])
    res = stability_matrix({"s0": a, "s1": b, "s2": c, "s3": a})
    assert res["names"] == ["s0", "s1", "s2", "s3"] and res["sizes"] == [4, 4, 2, 4]
    assert res["jaccard"][0][1] == res["jaccard"][1][0] == 2 / 6  # |{2,3}| / |{0..5}|
    assert res["overlap"][0][1] == 2 / 4 and res["jaccard"][0][2] == 0.0 and res["jaccard"][0][3] == 1.0
    assert [r["jaccard"] for r in res["consecutive"]] == [2 / 6, 0.0, 0.0]
    assert [(r["from"], r["to"]) for r in res["consecutive"]] == [("s0", "s1"), ("s1", "s2"), ("s2", "s3")]
    assert res["min_jaccard"] == 0.0 and res["max_jaccard"] == 1.0
    assert res["mean_jaccard"] == pytest.approx((2 / 6 + 0 + 1 + 0 + 2 / 6 + 0) / 6)
    single = stability_matrix({"only": a})
    assert single["jaccard"] == [[1.0]] and single["mean_jaccard"] is None and single["consecutive"] == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sets(st.integers(0, 30), min_size=1, max_size=12), min_size=2, max_size=5))
def test_stability_matrix_properties(sets):
    sels = {f"c{i}": _sel([("w", v) for v in s]) for i, s in enumerate(sets)}
    res = stability_matrix(sels)
    n = len(sets)
    for i in range(n):
        assert res["jaccard"][i][i] == 1.0
        for j in range(n):
            assert res["jaccard"][i][j] == res["jaccard"][j][i]
            assert 0.0 <= res["jaccard"][i][j] <= res["overlap"][i][j] <= 1.0
            assert (res["jaccard"][i][j] == 1.0) == (sets[i] == sets[j])
    assert res["min_jaccard"] <= res["mean_jaccard"] <= res["max_jaccard"]


def test_super_weight_appears_and_stays():
    sw, other = _candidate("down", 13, 500.0), _candidate("down", 2, 80.0)
    reports = {"step0": _report(), "step1": _report(other), "step2": _report(sw, other), "step3": _report(sw)}
    res = super_weight_appearance(reports)
    assert res["target"]["param_name"] == "down" and res["target"]["flat_index"] == 13
    assert res["target"]["found_at"] == "step3" and (res["target"]["row"], res["target"]["col"]) == (1, 5)
    assert [r["detected"] for r in res["checkpoints"]] == [False, False, True, True]
    assert res["first_appearance"] == res["stable_from"] == "step2"
    assert (
        res["checkpoints"][1]["strongest"]["flat_index"] == 2 and res["checkpoints"][0]["strongest"] is None
    )
    assert res["checkpoints"][2]["spike_layers"] == [1] and res["checkpoints"][0]["n_candidates"] == 0
    assert res["first_in_topk"] is None and res["checkpoints"][0]["in_topk"] is None


def test_super_weight_that_comes_and_goes():
    sw = _candidate("down", 13, 500.0)
    reports = {"a": _report(sw), "b": _report(), "c": _report(sw), "d": _report(sw)}
    sels = {"a": _sel([("up", 0)]), "b": _sel([("down", 13)]), "c": _sel([("down", 13)]), "d": _sel([])}
    res = super_weight_appearance(reports, sels)
    assert res["first_appearance"] == "a" and res["stable_from"] == "c"
    assert [r["in_topk"] for r in res["checkpoints"]] == [False, True, True, False]
    assert res["first_in_topk"] == "b"
    gone = super_weight_appearance({"a": _report(sw), "b": _report()})
    assert (
        gone["target"]["found_at"] == "a" and gone["first_appearance"] == "a" and gone["stable_from"] is None
    )
    explicit = super_weight_appearance(reports, target=("down", 99))
    assert explicit["first_appearance"] is None and explicit["target"]["found_at"] is None
    nothing = super_weight_appearance({"a": _report(), "b": _report()})
    assert (
        nothing["target"] is None and nothing["first_appearance"] is None and nothing["stable_from"] is None
    )


def test_checkpoint_specs():
    assert split_spec("pythia-160m@step1000") == ("pythia-160m", "step1000")
    assert split_spec("EleutherAI/pythia-70m@step0") == ("EleutherAI/pythia-70m", "step0")
    assert split_spec("tiny-llama") == ("tiny-llama", None)
    with pytest.raises(ConfigError, match="NAME@REVISION"):
        split_spec("pythia-160m@")
    assert pythia_checkpoints("pythia-410m", (0, 512, 143000)) == [
        "pythia-410m@step0",
        "pythia-410m@step512",
        "pythia-410m@step143000",
    ]
    assert len(PYTHIA_STEPS) == 154 and PYTHIA_STEPS[-1] == 143000
    with pytest.raises(ConfigError, match="no checkpoint at step"):
        pythia_checkpoints("pythia-160m", (1500,))
    with pytest.raises(ModelError, match="hub id"):
        load_checkpoint("tiny-llama@step1")


def test_hub_revision_is_passed_to_transformers(monkeypatch, trained):
    """Offline: the hub path loads ``EleutherAI/pythia-160m`` at the revision (stubbed here)."""
    import transformers

    seen: list[tuple] = []
    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer"):
        original = getattr(transformers, cls_name).from_pretrained
        monkeypatch.setattr(
            getattr(transformers, cls_name),
            "from_pretrained",
            _redirect(original, cls_name, trained[-1], seen),
        )
    lm = load_checkpoint("pythia-160m@step1000", dtype="fp32", device="cpu")
    assert seen == [
        ("AutoModelForCausalLM", "EleutherAI/pythia-160m", "step1000"),
        ("AutoTokenizer", "EleutherAI/pythia-160m", "step1000"),
    ]
    assert lm.identity["revision"] == "step1000" and lm.source == "hub"


def _redirect(original, cls_name, directory, seen):
    def from_pretrained(target, **kwargs):
        seen.append((cls_name, target, kwargs.pop("revision", None)))
        return original(str(directory), **kwargs)

    return from_pretrained


def test_unreachable_revision_names_the_offline_fix(monkeypatch):
    import transformers

    def offline(target, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError, match=r"hf download EleutherAI/pythia-160m --revision step1000"):
        load_checkpoint("pythia-160m@step1000", device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[Path]:
    """A GPT-NeoX (hidden 32, 2 layers; fixtures/train_scaling_family.py's config) trained for 30
    steps on the built-in corpus, saved with its tokenizer after the steps in SAVE_AT."""
    spec = importlib.util.spec_from_file_location("train_scaling_family", TRAIN_SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    from transformers import AutoModelForCausalLM

    from esa.evaluate import lm_loss

    out = tmp_path_factory.mktemp("checkpoints")
    windows = make_windows(builtin_tokenizer(), builtin_corpus(), 64)
    start = time.perf_counter()
    dirs = []
    with recipe.deterministic(1):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(recipe.build_config(32, 2), dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        order = recipe.batch_order(windows.shape[0], SAVE_AT[-1], 8, seed=0)
        for step in range(SAVE_AT[-1] + 1):
            if step in SAVE_AT:
                dirs.append(out / f"step{step}")
                model.save_pretrained(dirs[-1])
                builtin_tokenizer().save_pretrained(dirs[-1])
            if step < SAVE_AT[-1]:
                model.train()
                loss = lm_loss(model, windows[order[step]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    assert time.perf_counter() - start < 10.0, "keep the tiny training under 10 s"
    return dirs


def test_temporal_stability_over_trained_checkpoints(trained, tmp_path):
    calib = make_windows(builtin_tokenizer(), builtin_corpus()[-20000:], 32)[:4]
    copy = tmp_path / "final-copy"
    shutil.copytree(trained[-1], copy)
    specs = [str(d) for d in trained] + [str(copy)]
    res = temporal_stability(
        specs,
        calib,
        "grad_x_weight",
        k=8,
        detect={"threshold": 0.0, "ratio": 0.0},
        device="cpu",
        progress=False,
    )
    st_ = res["stability"]
    assert st_["names"] == specs and len(st_["consecutive"]) == len(specs) - 1
    assert st_["jaccard"][-2][-1] == 1.0  # the same weights scored on the same windows: the same top-k
    assert st_["jaccard"][0][-2] < 1.0  # training moved the top-k set
    assert all(0.0 <= r["jaccard"] <= 1.0 for r in st_["consecutive"])
    sw = res["super_weight"]
    assert (
        sw["target"] is not None and sw["target"]["found_at"] == specs[-1]
    )  # threshold 0: always a candidate
    assert sw["checkpoints"][-1]["detected"] and sw["checkpoints"][-2]["detected"]
    assert sw["stable_from"] in specs and specs.index(sw["stable_from"]) <= len(specs) - 2
    with pytest.raises(ConfigError, match="at least 2"):
        temporal_stability(specs[:1], calib)
    with pytest.raises(ConfigError, match="twice"):
        temporal_stability([specs[0], specs[0]], calib, "magnitude", k=2, device="cpu", progress=False)
