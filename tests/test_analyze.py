"""Tests for esa.analyses.components: shares sum to 1, score statistics match brute force on fused tensors,
per-head / per-expert counts add up, head sizes match per-head counts of every entry, comparison and
heatmap shapes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from esa.analyses.components import (
    GROUPS,
    compare_models,
    component_table,
    group_of,
    group_ratios,
    head_sizes,
    heatmap,
    located_frame,
    per_expert,
    per_head,
)
from esa.errors import ConfigError
from esa.metrics.registry import compute_scores
from esa.models import load_model
from esa.models.params import ParamMap
from esa.select import select

ARCHS = ("tiny-llama", "tiny-phi3", "tiny-pythia", "tiny-mixtral")
FIXED = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ARCHS:
        lm = load_model(name)
        names = lm.param_map.scorable(include_embeddings=True, include_norms=True)
        out[name] = (lm, compute_scores(lm, "magnitude", None, names=names, progress=False))
    return out


@FIXED
@given(
    arch=st.sampled_from(ARCHS),
    k=st.integers(1, 40),
    kind=st.sampled_from(["top", "random", "bottom"]),
    mode=st.sampled_from(["per_layer", "global"]),
    seed=st.integers(0, 3),
)
def test_shares_sum_to_one(models, arch, k, kind, mode, seed):
    lm, scores = models[arch]
    sel = select(scores, k, kind=kind, mode=mode, seed=seed)
    table = component_table(sel.to_frame(lm.param_map), lm.param_map, scores)
    assert int(table["count"].sum()) == sel.size
    assert table["share"].sum() == pytest.approx(1.0)
    assert table["score_share"].sum() == pytest.approx(1.0)
    assert int(table["entries"].sum()) == sum(s.numel() for s in scores.values())
    ratios = group_ratios(table)
    assert set(ratios["topk"]) == set(GROUPS)
    assert sum(ratios["topk"].values()) == pytest.approx(1.0)
    assert sum(ratios["score"].values()) == pytest.approx(1.0)
    assert ratios["n_selected"] == sel.size
    assert json.loads(json.dumps(ratios)) == ratios
    # per-head counts add up to the selected attention entries
    heads = per_head(sel, lm.param_map, lm.model.config)
    loc = located_frame(sel, lm.param_map)
    n_attn = int((loc["component"].map(group_of) == "attention").sum())
    assert int(heads["count"].sum()) == n_attn


def test_table_without_scores_and_located_components(models):
    lm, scores = models["tiny-phi3"]
    sel = select(scores, 5, kind="top", mode="per_layer")
    table = component_table(sel, lm.param_map)
    assert "score_sum" not in table.columns
    assert table["share"].sum() == pytest.approx(1.0)
    # fused qkv / gate_up are split into their parts, never reported as fused components
    assert not {"attn_qkv", "mlp_gate_up"} & set(table["component"])
    assert table.loc[table["layer"] == -1, "component"].isin(["embed", "lm_head", "norm"]).all()
    assert group_ratios(table)["score"] is None
    with pytest.raises(ConfigError):
        component_table(sel.to_frame().drop(columns=["flat_index"]), lm.param_map)


def _with_qkv_parts(param_map):
    """The phi3 map with qkv_proj described as fused q/k/v parts (built by hand, so this test of
    esa.analyses.components does not depend on how esa.models.params classifies fused qkv names)."""
    infos = dict(param_map.infos)
    for name, info in infos.items():
        if name.endswith("qkv_proj.weight"):
            parts = ((0, 64, "attn_q"), (64, 96, "attn_k"), (96, 128, "attn_v"))
            infos[name] = dataclasses.replace(info, component="attn_qkv", parts=parts)
    return ParamMap(infos)


def test_score_stats_match_brute_force_on_fused_parts(models):
    lm, scores = models["tiny-phi3"]
    pmap = _with_qkv_parts(lm.param_map)
    sel = select(scores, 3, kind="top", mode="per_layer")
    table = component_table(sel.to_frame(pmap), pmap, scores).set_index(["layer", "component", "expert"])
    qkv = scores["model.layers.2.self_attn.qkv_proj.weight"]
    gate_up = scores["model.layers.2.mlp.gate_up_proj.weight"]
    expect = {
        "attn_q": qkv[:64],
        "attn_k": qkv[64:96],
        "attn_v": qkv[96:],
        "mlp_gate": gate_up[:176],
        "mlp_up": gate_up[176:],
    }
    for comp, part in expect.items():
        row = table.loc[(2, comp, -1)]
        assert row["entries"] == part.numel()
        assert row["score_max"] == pytest.approx(float(part.max()))
        assert row["score_mean"] == pytest.approx(float(part.double().mean()))
        assert row["score_sum"] == pytest.approx(float(part.double().sum()))
    assert table.loc[(2, "attn_o", -1), "entries"] == 64 * 64
    assert "attn_qkv" not in set(table.index.get_level_values("component"))
    # per head on the fused tensor: 4 query heads, 2 key-value heads (head_dim 16)
    everything = select({"model.layers.2.self_attn.qkv_proj.weight": qkv}, qkv.numel())
    heads = per_head(everything, pmap, lm.model.config).set_index(["component", "head"])["count"]
    assert heads.to_dict() == {
        **{("attn_q", h): 16 * 64 for h in range(4)},
        **{(c, h): 16 * 64 for c in ("attn_k", "attn_v") for h in range(2)},
    }


def test_per_expert_on_mixtral(models):
    lm, scores = models["tiny-mixtral"]
    sel = select(scores, 30, kind="top", mode="per_layer")
    table = per_expert(sel, lm.param_map, scores)
    loc = located_frame(sel, lm.param_map)
    moe = loc[loc["expert"] >= 0]
    assert set(table["part"]) == {"experts", "router"}
    assert set(table["expert"]) == {0, 1, 2, 3} and set(table["layer"]) == {0, 1, 2, 3}
    assert len(table) == 4 * 4 * 2
    assert int(table["count"].sum()) == len(moe)
    # score mass: every expert tensor entry and every router entry is counted once
    moe_mass = sum(
        float(s.double().sum())
        for n, s in scores.items()
        if ".experts." in n or lm.param_map[n].component == "router"
    )
    total = sum(float(s.double().sum()) for s in scores.values())
    assert table["score_share"].sum() == pytest.approx(moe_mass / total)
    router = table[(table["part"] == "router") & (table["layer"] == 1)].set_index("expert")["score_sum"]
    w = scores["model.layers.1.mlp.gate.weight"].double().sum(1)
    assert router.tolist() == pytest.approx(w.tolist())
    down = scores["model.layers.0.mlp.experts.down_proj"]
    comp = component_table(sel, lm.param_map, scores).set_index(["layer", "component", "expert"])
    assert comp.loc[(0, "mlp_down", 2), "score_max"] == pytest.approx(float(down[2].max()))
    assert comp.loc[(0, "mlp_gate", 3), "entries"] == 64 * 64


def test_per_head_on_dense_model_has_no_expert_rows(models):
    lm, scores = models["tiny-llama"]
    layer0 = {n: s for n, s in scores.items() if n.startswith("model.layers.0.self_attn.")}
    sel = select(layer0, sum(s.numel() for s in layer0.values()), mode="global")  # every entry
    heads = per_head(sel, lm.param_map, lm.model.config)
    q = heads[(heads["component"] == "attn_q") & (heads["layer"] == 0)]
    assert q["head"].tolist() == [0, 1, 2, 3] and q["count"].tolist() == [1024] * 4
    k = heads[(heads["component"] == "attn_k") & (heads["layer"] == 0)]
    assert k["head"].tolist() == [0, 1]  # grouped-query: 2 key-value heads
    o = heads[(heads["component"] == "attn_o") & (heads["layer"] == 0)]
    assert o["count"].tolist() == [1024] * 4
    assert heads["share"].sum() == pytest.approx(1.0)
    assert per_expert(sel, lm.param_map).empty


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-phi3", "tiny-pythia", "tiny-mixtral"])
def test_head_sizes_match_per_head_of_every_entry(models, arch):
    """head_sizes' cells (biases included) are per_head's cells when every attention entry is selected."""
    from esa.analyses.heads_plot import plot_head_heatmap

    lm, scores = models[arch]
    attn = {n: s for n, s in scores.items() if group_of(lm.param_map[n].component) == "attention"}
    sel = select(attn, sum(s.numel() for s in attn.values()), mode="global")
    heads = per_head(sel, lm.param_map, lm.model.config).set_index(["layer", "component", "head"])["count"]
    sizes = head_sizes(lm.param_map, lm.model.config, list(scores)).set_index(["layer", "component", "head"])
    assert sizes["weights"].to_dict() == heads.to_dict()
    assert int(sizes["weights"].sum()) == sum(s.numel() for s in attn.values())
    cells = sizes.reset_index().rename(columns={"weights": "count"})
    assert isinstance(plot_head_heatmap(cells), Figure)
    with pytest.raises(ValueError):
        plot_head_heatmap(cells, value="nope")


def test_compare_models_and_heatmap(models):
    tables = {}
    for name in ARCHS:
        lm, scores = models[name]
        tables[name] = component_table(select(scores, 20, kind="top", mode="global"), lm.param_map, scores)
    cmp = compare_models(tables)
    assert list(cmp.columns) == list(ARCHS)
    assert cmp.sum().tolist() == pytest.approx([1.0] * len(ARCHS))
    by_group = compare_models(tables, value="score_share", by="group")
    assert list(by_group.columns) == list(ARCHS) and set(by_group.index) <= set(GROUPS)
    assert by_group.sum().tolist() == pytest.approx([1.0] * len(ARCHS))
    with pytest.raises(ConfigError):
        compare_models({})
    fig = heatmap(tables["tiny-mixtral"], value="share")
    assert isinstance(fig, Figure)
    assert isinstance(heatmap(tables["tiny-llama"], value="score_mean"), Figure)
    with pytest.raises(ConfigError):
        heatmap(tables["tiny-llama"], value="nope")


def test_unknown_tensor_is_rejected(models):
    lm, _ = models["tiny-llama"]
    _other, other_scores = models["tiny-pythia"]
    sel = select(other_scores, 2)
    with pytest.raises(ConfigError):
        component_table(sel, lm.param_map)
    with pytest.raises(ConfigError):
        component_table(select({"x": torch.ones(3, 3)}, 1), lm.param_map)
