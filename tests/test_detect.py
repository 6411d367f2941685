"""Tests for esa.analyses.detect and ``esa detect``: planted super weights are found exactly (dense and
fused experts), ranks match brute force, the super-activation control restores the baseline exactly,
and the CLI prints the detector's measurements as JSON."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import esa.models
from esa.analyses.detect import (
    SuperWeight,
    detect_super_weights,
    random_weight_selection,
    rank_under_metric,
    super_activation_control,
)
from esa.cli import main
from esa.data import make_windows
from esa.errors import ConfigError
from esa.models import load_model, moe
from esa.models.tokenizer import builtin_corpus
from esa.perturb import perturbed
from esa.select import Selection

CONST_DIM = 5  # residual dimension made constant (and so dominant) for every token
LAYER = 1


def _bits(model):
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}


@contextlib.contextmanager
def _restoring(lm, names):
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    try:
        yield params
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


@contextlib.contextmanager
def planted_llama(lm, row, col, value=1.0):
    """A super weight at layers[1].mlp.down_proj[row, col]: embedding dim CONST_DIM is 1 for every
    token (so the RMS-normed input has ~8 there), gate and up rows ``col`` read only that dim (the
    intermediate channel ``col`` is ~1600 on every token) and column ``col`` of down_proj is zero
    except ``row``."""
    mlp = f"model.layers.{LAYER}.mlp."
    names = [
        "model.embed_tokens.weight",
        mlp + "gate_proj.weight",
        mlp + "up_proj.weight",
        mlp + "down_proj.weight",
    ]
    with _restoring(lm, names) as p, torch.no_grad():
        p[names[0]][:, CONST_DIM] = 1.0
        for n in names[1:3]:
            p[n][col] = 0.0
            p[n][col, CONST_DIM] = 5.0
        p[names[3]][:, col] = 0.0
        p[names[3]][row, col] = value
        yield


@contextlib.contextmanager
def planted_mixtral(lm, expert, row, col):
    """The same plant inside fused expert ``expert`` of layer 1, whose router row reads only the
    constant dimension, so every token is routed to it."""
    pre = f"model.layers.{LAYER}.mlp."
    names = [
        "model.embed_tokens.weight",
        pre + "gate.weight",
        pre + "experts.gate_up_proj",
        pre + "experts.down_proj",
    ]
    inter = lm.model.config.intermediate_size
    with _restoring(lm, names) as p, torch.no_grad():
        p[names[0]][:, CONST_DIM] = 1.0
        p[names[1]][expert, CONST_DIM] = 10.0
        for r in (col, inter + col):  # gate row, up row
            p[names[2]][expert, r] = 0.0
            p[names[2]][expert, r, CONST_DIM] = 5.0
        p[names[3]][expert, :, col] = 0.0
        p[names[3]][expert, row, col] = 1.0
        yield


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def mixtral():
    return load_model("tiny-mixtral")


@pytest.fixture(scope="module")
def eval_ids(llama):
    return make_windows(llama.tokenizer, builtin_corpus()[:20000], 32)[:4]


def test_finds_planted_weight_exactly(llama):
    with planted_llama(llama, 7, 100):
        rep = detect_super_weights(llama)
        w = float(llama.model.model.layers[LAYER].mlp.down_proj.weight[7, 100])
    assert rep.spike_layers == [LAYER]
    assert [c.key for c in rep.candidates] == [(LAYER, 7, 100)]
    c = rep.candidates[0]
    assert c.param_name == f"model.layers.{LAYER}.mlp.down_proj.weight"
    assert c.flat_index == 7 * 176 + 100 and c.expert is None and c.weight == w == 1.0
    assert abs(c.input_activation) > 50 and abs(c.output_activation) > 50
    la = rep.layers[LAYER]
    assert (la.input_channel, la.output_channel) == (100, 7)
    assert la.max_abs_output == pytest.approx(abs(c.output_activation))
    assert rep.prompt == "Apple Inc. is a worldwide tech company."
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert all(type(v) is float for la in d["layers"] for k, v in la.items() if k.startswith("max_abs"))
    assert {n: t.tolist() for n, t in rep.coordinates.items()} == {c.param_name: [c.flat_index]}
    sel = rep.selection()
    assert isinstance(sel, Selection) and sel.keys() == {(c.param_name, c.flat_index)}
    assert sel.to_frame(llama.param_map)[["layer", "row", "col"]].values.tolist() == [[LAYER, 7, 100]]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    row=st.integers(0, 63).filter(lambda r: r != CONST_DIM),
    col=st.integers(0, 175),
    value=st.sampled_from([1.0, -1.0, 0.5]),
)
def test_planted_weight_found_anywhere(llama, row, col, value):
    with planted_llama(llama, row, col, value):
        rep = detect_super_weights(llama)
    assert [c.key for c in rep.candidates] == [(LAYER, row, col)]
    assert rep.candidates[0].weight == value


def test_unplanted_random_model_has_no_candidate(llama):
    before = _bits(llama.model)
    rep = detect_super_weights(llama)
    assert rep.candidates == [] and rep.spike_layers == []
    assert len(rep.layers) == 4
    assert all(torch.equal(before[n], v) for n, v in _bits(llama.model).items())


def test_input_ids_and_validation(llama):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with planted_llama(llama, 2, 3):
        rep = detect_super_weights(llama, ids[0])
    assert rep.prompt is None and rep.n_tokens == 6
    assert [c.key for c in rep.candidates] == [(LAYER, 2, 3)]
    with pytest.raises(ConfigError):
        detect_super_weights(llama, ids, top=0)


def test_threshold_zero_candidates_match_layer_maxima():
    lm = load_model("tiny-pythia")  # GPT-NeoX dense_4h_to_h
    rep = detect_super_weights(lm, threshold=0.0, ratio=0.0, top=100)
    params = dict(lm.model.named_parameters())
    assert [la.module.rsplit(".", 1)[1] for la in rep.layers] == ["dense_4h_to_h"] * 4
    for c in rep.candidates:
        assert params[c.param_name].reshape(-1)[c.flat_index].item() == c.weight
        assert params[c.param_name][c.row, c.col].item() == c.weight
    top_out = {la.layer: la.max_abs_output for la in rep.layers}
    assert max(abs(c.output_activation) for c in rep.candidates) == pytest.approx(max(top_out.values()))


def test_fused_expert_replay_matches_module(mixtral):
    layer = mixtral.model.model.layers[LAYER].mlp
    seen = {}

    def hook(mod, args, kwargs, out):
        x, index, weights = (
            args
            if len(args) == 3
            else (kwargs["hidden_states"], kwargs["top_k_index"], kwargs["top_k_weights"])
        )
        total = torch.zeros_like(out)
        for slot in range(index.shape[1]):
            for e in range(mod.num_experts):
                rows = (index[:, slot] == e).nonzero().squeeze(-1)
                if rows.numel():
                    y = moe.expert_out(mod, e, moe.expert_mid(mod, e, x[rows]))
                    total[rows] += y * weights[rows, slot, None]
        seen["ok"] = torch.allclose(total, out, atol=1e-6, rtol=1e-4)

    h = layer.experts.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            mixtral.model(torch.tensor([[5, 9, 11, 40, 2]]))
    finally:
        h.remove()
    assert seen["ok"]


@pytest.mark.parametrize("expert,row,col", [(2, 9, 30), (0, 63, 0)])
def test_finds_planted_weight_in_fused_experts(mixtral, expert, row, col):
    with planted_mixtral(mixtral, expert, row, col):
        rep = detect_super_weights(mixtral)
    assert [(c.key, c.expert) for c in rep.candidates] == [((LAYER, row, col), expert)]
    c = rep.candidates[0]
    down = dict(mixtral.model.named_parameters())[c.param_name]
    assert c.param_name.endswith("experts.down_proj") and down.shape == (4, 64, 64)
    assert c.flat_index == (expert * 64 + row) * 64 + col
    assert mixtral.param_map[c.param_name].locate(c.flat_index)[1:] == (expert, row, col)
    assert rep.layers[LAYER].expert == expert


def _scores_strategy():
    shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4)
    return shapes.flatmap(
        lambda ss: st.tuples(
            st.just(ss),
            st.lists(
                st.integers(-3, 3), min_size=sum(a * b for a, b in ss), max_size=sum(a * b for a, b in ss)
            ),
            st.sampled_from([torch.float32, torch.float16, torch.float64, torch.bfloat16]),
        )
    )


@settings(max_examples=60, deadline=None)
@given(data=_scores_strategy(), pick=st.integers(0, 10_000), nan=st.booleans())
def test_rank_matches_brute_force(data, pick, nan):
    shapes, values, dtype = data
    flat = torch.tensor(values, dtype=torch.float64) / 2
    if nan:
        flat[pick % flat.numel()] = float("nan")
    scores, start = {}, 0
    for i, (a, b) in enumerate(shapes):
        scores[f"t{i}"] = flat[start : start + a * b].reshape(a, b).to(dtype)
        start += a * b
    name = f"t{pick % len(shapes)}"
    idx = pick % scores[name].numel()
    allv = torch.cat([s.double().reshape(-1) for s in scores.values()])
    v = scores[name].double().reshape(-1)[idx]
    expected = 1 + int((~torch.isnan(allv)).sum() if torch.isnan(v) else (allv > v).sum())
    assert rank_under_metric(scores, name, idx) == expected


def test_rank_validation():
    with pytest.raises(ConfigError):
        rank_under_metric({"a": torch.ones(3)}, "b", 0)
    with pytest.raises(ConfigError):
        rank_under_metric({"a": torch.ones(3)}, "a", 3)


def test_control_all_positions_restores_baseline_exactly(llama, eval_ids):
    before = _bits(llama.model)
    with planted_llama(llama, 7, 100):
        cand = detect_super_weights(llama).candidates[0]
        spike = super_activation_control(llama, cand, eval_ids, batch_size=2)
        full = super_activation_control(llama, [cand], eval_ids, positions="all", batch_size=3)
        rnd = random_weight_selection(llama, [cand], seed=0)
    assert full.ppl_restored == full.ppl_baseline  # bit-identical forward pass
    assert full.nll_restored == full.nll_baseline
    assert full.n_restored == full.n_positions == eval_ids.numel()
    assert full.ppl_zeroed != full.ppl_baseline
    assert spike.ppl_baseline == full.ppl_baseline and spike.ppl_zeroed == full.ppl_zeroed
    assert 0 <= spike.n_restored <= spike.n_positions == eval_ids.numel()
    assert json.loads(json.dumps(full.to_dict())) == full.to_dict()
    assert all(torch.equal(before[n], v) for n, v in _bits(llama.model).items())
    ((name, idx),) = rnd.keys()
    assert name == cand.param_name and idx != cand.flat_index


def test_control_restores_fused_experts_exactly(mixtral, eval_ids):
    with planted_mixtral(mixtral, 1, 4, 8):
        rep = detect_super_weights(mixtral)
        res = super_activation_control(mixtral, rep, eval_ids, positions="all", batch_size=4)
        with perturbed(mixtral.model, rep.selection(), "zero") as info:
            assert info.n_changed == 1
    assert res.ppl_zeroed != res.ppl_baseline
    assert res.ppl_restored == pytest.approx(res.ppl_baseline, rel=1e-6)


def test_control_validation(llama, eval_ids):
    with pytest.raises(ConfigError):
        super_activation_control(llama, [], eval_ids)
    cand = SuperWeight(
        1,
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj",
        0,
        0,
        None,
        0,
        0.0,
        0.0,
        0.0,
        0,
    )
    with pytest.raises(ConfigError):
        super_activation_control(llama, cand, eval_ids, positions="some")


# --- esa detect ----------------------------------------------------------------------------------

DETECT = ["detect", "--model", "tiny-mixtral", "--windows", "2", "--length", "32", "--data-file", "builtin"]


def _cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_detect_without_candidates_prints_the_report(capsys):
    code, stdout, err = _cli(DETECT, capsys)
    assert code == 0, err
    out = json.loads(stdout)
    assert set(out) == {"model", "detector"} and out["model"] == "tiny-mixtral"
    assert out["detector"]["candidates"] == [] and len(out["detector"]["layers"]) == 4


def test_cli_detect_measures_the_planted_weight(mixtral, capsys, monkeypatch):
    monkeypatch.setattr(esa.models, "load_model", lambda *a, **k: mixtral)
    with planted_mixtral(mixtral, 1, 4, 8):
        code, stdout, err = _cli([*DETECT, "--seed", "3"], capsys)
    assert code == 0, err
    out = json.loads(stdout)
    assert list(out) == [
        "model",
        "detector",
        "magnitude_rank",
        "magnitude_entries",
        "random_weight",
        "restore_spike_positions",
        "restore_all_positions",
        "primary",
        "ppl",
        "eval",
        "seconds",
    ]
    assert out["primary"] == f"layer {LAYER} row 4 col 8" and list(out["magnitude_rank"]) == [f"{LAYER}:4:8"]
    assert out["eval"] == {"data": "builtin:pydoc_data.topics", "windows": 2, "length": 32, "bos": False}
    ppl = out["ppl"]
    assert ppl["zero_primary"] == ppl["zero_all_candidates"] != ppl["baseline"]
    assert ppl["zero_primary_restore_all"] == pytest.approx(ppl["baseline"], rel=1e-6)
    assert out["restore_all_positions"] == [2 * 32, 2 * 32]
    ((name, [idx]),) = out["random_weight"].items()
    assert name.endswith("experts.down_proj") and idx != (1 * 64 + 4) * 64 + 8


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--windows", "0"], "--windows"),
        (["--length", "1"], "--length"),
        (["--top", "0"], "--top"),
        (["--data-file", "no-such-file.txt"], "not found"),
    ],
)
def test_cli_detect_bad_input_one_line_error(extra, needle, capsys):
    code, _, err = _cli([*DETECT, *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("esa: error: ") and needle in lines[0], err
