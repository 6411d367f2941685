"""Tests for esa.models.params: every parameter mapped, layers, the component vocabulary, and that the
parts of fused tensors match how transformers' modeling code actually splits them.

The fused-tensor checks are functional: perturb rows of the real tensor, run the real module and
see which of q / k / v (and which head) or gate / up changes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from esa.models import load_model
from esa.models.params import ParamInfo, ParamMap, build_param_map, head_of_row
from esa.models.tiny import tiny_models

TINY = tiny_models()
LAYERS = 4
HEAD_DIM = 16  # hidden 64 / 4 heads

PER_LAYER = {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"}
# Tensor-level components (fused tensors keep a fused name) and part-level components per layer.
COMPONENTS = {
    "tiny-llama": {
        "embed",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_o",
        "mlp_gate",
        "mlp_up",
        "mlp_down",
        "norm",
        "lm_head",
    },
    "tiny-mistral": {
        "embed",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_o",
        "mlp_gate",
        "mlp_up",
        "mlp_down",
        "norm",
        "lm_head",
    },
    "tiny-pythia": {"embed", "attn_qkv", "attn_o", "mlp_up", "mlp_down", "norm", "lm_head"},
    "tiny-phi3": {"embed", "attn_qkv", "attn_o", "mlp_gate_up", "mlp_down", "norm", "lm_head"},
    "tiny-mixtral": {
        "embed",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_o",
        "router",
        "mlp_gate_up",
        "mlp_down",
        "norm",
        "lm_head",
    },
}
LAYER_PARTS = {
    "tiny-llama": PER_LAYER,
    "tiny-mistral": PER_LAYER,
    "tiny-pythia": PER_LAYER - {"mlp_gate"},
    "tiny-phi3": PER_LAYER,
    "tiny-mixtral": PER_LAYER | {"router"},
}


class _Quiet(dict):
    """A dict with a short repr (hypothesis prints fixture arguments of failing examples)."""

    def __repr__(self):
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="module")
def models():
    return _Quiet({name: load_model(name, device="cpu", seed=0) for name in TINY})


def _decoder_layers(model):
    return model.base_model.layers


def _part_components(info: ParamInfo) -> set[str]:
    return {c for _, _, c in info.parts} if info.parts else {info.component}


# --------------------------------------------------------------------------- coverage and layers


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_has_info(models, name):
    lm = models[name]
    params = dict(lm.model.named_parameters())
    assert list(lm.param_map) == list(params)  # same names, model order
    assert len(lm.param_map) == len(params)
    for pname, p in params.items():
        info = lm.param_map[pname]
        assert info.name == pname
        assert info.shape == tuple(p.shape)
        assert info.numel == p.numel()
        assert info.component != "other", pname
    rebuilt = build_param_map(lm.model)
    assert rebuilt.infos == lm.param_map.infos


@pytest.mark.parametrize("name", TINY)
def test_layer_indices(models, name):
    lm = models[name]
    prefix = {id(p): n for n, p in lm.model.named_parameters()}
    by_name = {}
    for i, layer in enumerate(_decoder_layers(lm.model)):
        for p in layer.parameters():
            by_name[prefix[id(p)]] = i
    assert len(by_name) > 0
    for pname, info in lm.param_map.infos.items():
        assert info.layer == by_name.get(pname), pname  # None outside the decoder layers
        assert info.layer is None or 0 <= info.layer < LAYERS
    assert lm.param_map.num_layers() == LAYERS == lm.model.config.num_hidden_layers


@pytest.mark.parametrize("name", TINY)
def test_component_vocabulary(models, name):
    pm = models[name].param_map
    assert {i.component for i in pm.values()} == COMPONENTS[name]
    for layer in range(LAYERS):
        parts = set().union(
            *(_part_components(i) for i in pm.values() if i.layer == layer and i.kind in ("matrix", "router"))
        )
        assert parts == LAYER_PARTS[name], layer
    non_layer = {i.component for i in pm.values() if i.layer is None}
    assert non_layer == {"embed", "norm", "lm_head"}


@pytest.mark.parametrize("name", TINY)
def test_kinds(models, name):
    lm = models[name]
    for pname, info in lm.param_map.infos.items():
        if info.component == "embed":
            assert info.kind == "embedding"
        elif info.component == "lm_head":
            assert info.kind == "lm_head"
        elif info.component == "norm":
            assert info.kind == "norm" and len(info.shape) == 1
        elif info.component == "router":
            assert info.kind == "router"
        elif len(info.shape) == 1:
            assert info.kind == "bias" and pname.endswith(".bias")
        else:
            assert info.kind == "matrix"
    assert (
        lm.model.get_input_embeddings().weight
        is dict(lm.model.named_parameters())[
            next(n for n, i in lm.param_map.infos.items() if i.kind == "embedding")
        ]
    )


def test_llama_names(models):
    pm = models["tiny-llama"].param_map
    expect = {
        "model.embed_tokens.weight": (None, "embed"),
        "model.layers.2.self_attn.q_proj.weight": (2, "attn_q"),
        "model.layers.2.self_attn.k_proj.weight": (2, "attn_k"),
        "model.layers.2.self_attn.v_proj.weight": (2, "attn_v"),
        "model.layers.2.self_attn.o_proj.weight": (2, "attn_o"),
        "model.layers.3.mlp.gate_proj.weight": (3, "mlp_gate"),
        "model.layers.3.mlp.up_proj.weight": (3, "mlp_up"),
        "model.layers.3.mlp.down_proj.weight": (3, "mlp_down"),
        "model.layers.1.input_layernorm.weight": (1, "norm"),
        "model.norm.weight": (None, "norm"),
        "lm_head.weight": (None, "lm_head"),
    }
    for n, (layer, comp) in expect.items():
        assert (pm[n].layer, pm[n].component) == (layer, comp), n
        assert pm[n].parts == () and pm[n].experts == 0


# --------------------------------------------------------------------------- scorable


@pytest.mark.parametrize("name", TINY)
def test_scorable(models, name):
    lm = models[name]
    params = dict(lm.model.named_parameters())
    pm = lm.param_map
    default = pm.scorable()
    # Default: the 2-D/3-D weight matrices inside the decoder layers (and routers), nothing else.
    assert default == [n for n, p in params.items() if p.ndim >= 2 and pm[n].layer is not None]
    assert not any(pm[n].kind in ("embedding", "lm_head", "norm", "bias") for n in default)
    emb = pm.scorable(include_embeddings=True)
    assert set(emb) - set(default) == {n for n in params if pm[n].component in ("embed", "lm_head")}
    assert len(set(emb) - set(default)) == 2
    norms = pm.scorable(include_norms=True)
    assert set(norms) - set(default) == {n for n, p in params.items() if p.ndim == 1}
    assert pm.scorable(include_embeddings=True, include_norms=True) == list(params)


def test_router_is_scorable(models):
    lm = models["tiny-mixtral"]
    pm = lm.param_map
    routers = [n for n, i in pm.infos.items() if i.component == "router"]
    assert len(routers) == LAYERS
    for layer, n in enumerate(routers):
        info = pm[n]
        assert info.kind == "router" and info.layer == layer and info.experts == 0
        router = _decoder_layers(lm.model)[layer].mlp.gate
        assert router.weight is dict(lm.model.named_parameters())[n]
        assert info.shape == (lm.model.config.num_local_experts, lm.model.config.hidden_size)
        assert n in pm.scorable()


# --------------------------------------------------------------------------- locate (pure)


@st.composite
def infos_and_index(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    experts = shape[0] if ndim == 3 else 0
    rows = shape[-2] if ndim >= 2 else shape[0]
    cuts = sorted(set(draw(st.lists(st.integers(1, rows), max_size=3))) | {rows})
    comps = ["attn_q", "attn_k", "attn_v", "mlp_gate"]
    parts, start = [], 0
    for i, stop in enumerate(cuts):
        if stop > start:
            parts.append((start, stop, comps[i % len(comps)]))
            start = stop
    if draw(st.booleans()):
        parts = []
    info = ParamInfo("w", shape, 0, "fused", "matrix", tuple(parts), experts)
    numel = 1
    for s in shape:
        numel *= s
    return info, draw(st.integers(0, numel - 1))


@settings(max_examples=300, deadline=None)
@given(infos_and_index())
def test_locate_inverts_flat_index(case):
    info, flat = case
    comp, expert, row, col = info.locate(flat)
    shape = info.shape
    if len(shape) == 1:
        assert (expert, col) == (None, 0)
        assert row == flat
    elif len(shape) == 2:
        assert expert is None
        assert row * shape[1] + col == flat
        assert 0 <= col < shape[1] and 0 <= row < shape[0]
    else:
        assert expert is not None and 0 <= expert < shape[0]
        assert (expert * shape[1] + row) * shape[2] + col == flat
    # Same element as indexing the tensor (no arithmetic shared with locate).
    grid = torch.arange(info.numel).view(shape)
    idx = (row,) if len(shape) == 1 else (row, col) if len(shape) == 2 else (expert, row, col)
    assert int(grid[idx]) == flat
    # The component is the part holding the row, else the tensor's own component.
    containing = [c for a, b, c in info.parts if a <= row < b]
    assert comp == (containing[0] if containing else "fused")
    assert comp == info.component_of_row(row)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_locate_on_real_tensors(models, data):
    name = data.draw(st.sampled_from(TINY))
    lm = models[name]
    params = dict(lm.model.named_parameters())
    pname = data.draw(st.sampled_from(list(params)))
    p, info = params[pname], lm.param_map[pname]
    flat = data.draw(st.integers(0, p.numel() - 1))
    _, expert, row, col = info.locate(flat)
    idx = (row,) if p.ndim == 1 else (row, col) if p.ndim == 2 else (expert, row, col)
    assert p.reshape(-1)[flat] == p[idx]


# --------------------------------------------------------------------------- fused qkv vs the modeling code


def _capture_qkv(model, ids):
    """(query, key, value) [B, heads, T, head_dim] as layer 0's attention receives them."""
    seen = []
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def get_interface(impl, default):
        fn = original(impl, default)

        def capture(module, query, key, value, *args, **kwargs):
            seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
            return fn(module, query, key, value, *args, **kwargs)

        return capture

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", get_interface)
        with torch.no_grad():
            model(ids, use_cache=False)
    assert len(seen) == LAYERS
    return seen[0]


ATTN_TENSORS = {
    "tiny-pythia": [
        "gpt_neox.layers.0.attention.query_key_value.weight",
        "gpt_neox.layers.0.attention.query_key_value.bias",
    ],
    "tiny-phi3": ["model.layers.0.self_attn.qkv_proj.weight"],
    "tiny-llama": [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ],
}


@pytest.fixture(scope="module")
def qkv_baseline(models):
    ids = torch.tensor([[5, 200, 31, 7, 900, 64, 12, 401]])
    return ids, _Quiet({name: _capture_qkv(models[name].model, ids) for name in ATTN_TENSORS})


@pytest.mark.parametrize("name", list(ATTN_TENSORS))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_qkv_rows_match_modeling_code(models, qkv_baseline, name, data):
    """Perturbing an output row changes exactly the projection (and head) that locate names."""
    lm = models[name]
    ids, baselines = qkv_baseline
    base = baselines[name]
    pname = data.draw(st.sampled_from(ATTN_TENSORS[name]))
    p, info = dict(lm.model.named_parameters())[pname], lm.param_map[pname]
    row = data.draw(st.integers(0, p.shape[0] - 1))
    flat = row * (p.shape[1] if p.ndim == 2 else 1)
    component, _, located_row, _ = info.locate(flat)
    assert located_row == row
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p[row] += 1.0
        now = _capture_qkv(lm.model, ids)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    changed = {
        c
        for c, before, after in zip(("attn_q", "attn_k", "attn_v"), base, now)
        if not torch.equal(before, after)
    }
    assert changed == {component}
    t = ("attn_q", "attn_k", "attn_v").index(component)
    heads = {h for h in range(base[t].shape[1]) if not torch.equal(base[t][:, h], now[t][:, h])}
    assert heads == {head_of_row(info, row, lm.model.config)}


@pytest.mark.parametrize("name", ["tiny-pythia", "tiny-phi3"])
def test_qkv_parts_partition_rows(models, name):
    lm = models[name]
    cfg = lm.model.config
    for pname, info in lm.param_map.infos.items():
        if "query_key_value" not in pname and "qkv_proj" not in pname:
            continue
        assert info.component == "attn_qkv"
        rows = info.shape[0]
        covered = [r for a, b, _ in info.parts for r in range(a, b)]
        assert sorted(covered) == list(range(rows))
        counts = {c: sum(b - a for a, b, x in info.parts if x == c) for c in ("attn_q", "attn_k", "attn_v")}
        kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        assert counts == {
            "attn_q": cfg.num_attention_heads * HEAD_DIM,
            "attn_k": kv * HEAD_DIM,
            "attn_v": kv * HEAD_DIM,
        }


# --------------------------------------------------------------------------- fused gate/up and experts


def _gate_up_check(run, gate_up: torch.Tensor, down: torch.Tensor, info: ParamInfo, unit: int, expert=None):
    """Isolate intermediate unit ``unit`` (zero every other down_proj column), then scale one of
    its two gate_up rows by 2: the output doubles exactly iff that row is the linear ``up`` half
    (silu(2g) != 2 silu(g))."""
    inter = gate_up.shape[-2] // 2
    sel = (lambda t: t[expert]) if expert is not None else (lambda t: t)
    saved_gu, saved_down = gate_up.detach().clone(), down.detach().clone()
    try:
        with torch.no_grad():
            keep = sel(down)[:, unit].clone()
            sel(down).zero_()
            sel(down)[:, unit] = keep
            base = run()
            assert base.abs().max() > 0
            results = {}
            for row in (unit, unit + inter):
                sel(gate_up)[row] *= 2
                out = run()
                sel(gate_up)[row] /= 2
                cols = gate_up.shape[-1]
                flat = ((expert or 0) * gate_up.shape[-2] + row) * cols
                comp, located_expert, _, _ = info.locate(flat)
                assert located_expert == expert
                results[comp] = torch.allclose(out, 2 * base, rtol=1e-5, atol=1e-7)
    finally:
        with torch.no_grad():
            gate_up.copy_(saved_gu)
            down.copy_(saved_down)
    assert results == {"mlp_up": True, "mlp_gate": False}


@pytest.mark.parametrize("unit", [0, 37, 175])
def test_phi3_gate_up_parts(models, unit):
    lm = models["tiny-phi3"]
    mlp = _decoder_layers(lm.model)[1].mlp
    info = lm.param_map["model.layers.1.mlp.gate_up_proj.weight"]
    assert info.component == "mlp_gate_up" and info.kind == "matrix"
    assert {c for _, _, c in info.parts} == {"mlp_gate", "mlp_up"}
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(unit))
    _gate_up_check(lambda: mlp(h), mlp.gate_up_proj.weight, mlp.down_proj.weight, info, unit)


def _experts_call(experts, h, expert):
    n = h.shape[0]
    other = (expert + 1) % experts.num_experts
    idx = torch.tensor([[expert, other]] * n)
    weights = torch.tensor([[1.0, 0.0]] * n)
    return experts(h, idx, weights)


@pytest.mark.parametrize("expert,unit", [(0, 0), (2, 40), (3, 63)])
def test_mixtral_gate_up_parts(models, expert, unit):
    lm = models["tiny-mixtral"]
    experts = _decoder_layers(lm.model)[2].mlp.experts
    info = lm.param_map["model.layers.2.mlp.experts.gate_up_proj"]
    assert info.experts == 4 and info.component == "mlp_gate_up" and info.layer == 2
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(expert))
    with torch.no_grad():
        _gate_up_check(
            lambda: _experts_call(experts, h, expert),
            experts.gate_up_proj,
            experts.down_proj,
            info,
            unit,
            expert,
        )


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_mixtral_locate_names_the_expert_that_computes(models, data):
    """Perturb the entry at a random flat index: only tokens routed to locate's expert change."""
    lm = models["tiny-mixtral"]
    layer = data.draw(st.integers(0, LAYERS - 1))
    which = data.draw(st.sampled_from(["gate_up_proj", "down_proj"]))
    experts = _decoder_layers(lm.model)[layer].mlp.experts
    p = getattr(experts, which)
    info = lm.param_map[f"model.layers.{layer}.mlp.experts.{which}"]
    assert info.experts == p.shape[0] == lm.model.config.num_local_experts
    assert info.component == ("mlp_gate_up" if which == "gate_up_proj" else "mlp_down")
    flat = data.draw(st.integers(0, p.numel() - 1))
    _, located, _row, _col = info.locate(flat)
    h = torch.randn(4, 64, generator=torch.Generator().manual_seed(flat))
    with torch.no_grad():
        before = [_experts_call(experts, h, e) for e in range(info.experts)]
        saved = p.view(-1)[flat].clone()
        try:
            p.view(-1)[flat] += 10.0
            after = [_experts_call(experts, h, e) for e in range(info.experts)]
        finally:
            p.view(-1)[flat] = saved
    changed = [e for e in range(info.experts) if not torch.equal(before[e], after[e])]
    assert changed == [located]


# --------------------------------------------------------------------------- ParamMap API


def test_param_map_container():
    infos = {
        "a": ParamInfo("a", (2, 3), 0, "attn_q", "matrix"),
        "b": ParamInfo("b", (3,), None, "norm", "norm"),
    }
    pm = ParamMap(infos)
    assert len(pm) == 2 and list(pm) == ["a", "b"] and "a" in pm and "c" not in pm
    assert pm["b"].numel == 3 and pm["a"].numel == 6
    assert pm.num_layers() == 1
    assert ParamMap({}).num_layers() == 0
    assert pm.scorable() == ["a"] and pm.scorable(include_norms=True) == ["a", "b"]
