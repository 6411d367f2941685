"""Architecture analysis of a selection: where the top-k entries sit (layer, component, head,
expert) and, with scores, how the score mass is spread.

Inputs are a selection frame (``Selection.to_frame(param_map)``, its CSV read back, or a
``Selection``) and the model's ``ParamMap``. Locations are recomputed from ``tensor`` and
``flat_index`` with ``ParamInfo.locate``, so fused tensors (qkv, gate_up) count under their parts
and fused experts under their expert. Entries outside any layer (embeddings, final norm, lm_head)
have layer ``-1`` in the tables.

Score statistics (``scores`` = name -> tensor) cover *every* entry of the scored tensors, not only
the selected ones: per cell the number of entries, sum (score mass), mean and max. NaN scores
propagate into their cell's statistics.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from esa.errors import ConfigError
from esa.models.params import ParamMap, head_of_row
from esa.plots import plot_layer_component_heatmap

NO_LAYER = -1
GROUPS = ("attention", "mlp", "norm", "embedding", "router", "other")
_EXPERT_OF_NAME = re.compile(r"\.experts\.(\d+)\.")
_KEYS = ["layer", "component", "expert"]


def group_of(component: str) -> str:
    """attention | mlp | norm | embedding | router | other for a component name."""
    if component.startswith("attn_"):
        return "attention"
    if component.startswith("mlp_"):
        return "mlp"
    if component in ("embed", "lm_head"):
        return "embedding"
    if component in ("norm", "router"):
        return component
    return "other"


def located_frame(selection_frame, param_map: ParamMap) -> pd.DataFrame:
    """tensor, flat_index, layer (-1 if none), component, expert (-1 if none), row, col, score of
    every selected entry, located with ``param_map``."""
    df = selection_frame.to_frame(param_map) if hasattr(selection_frame, "to_frame") else selection_frame
    if not {"tensor", "flat_index"} <= set(df.columns):
        raise ConfigError(
            "the selection frame needs 'tensor' and 'flat_index' columns; "
            "pass Selection.to_frame(param_map) output"
        )
    rows = []
    scores = df["score"].astype(float).tolist() if "score" in df.columns else [np.nan] * len(df)
    for name, flat, score in zip(df["tensor"].astype(str), df["flat_index"].astype(int), scores):
        if name not in param_map:
            raise ConfigError(
                f"tensor {name!r} of the selection is not in the parameter map; "
                "pass the param_map of the model the selection was made on"
            )
        info = param_map[name]
        component, expert, row, col = info.locate(flat)
        rows.append((name, int(flat), _layer(info), component, _expert(info, expert, row), row, col, score))
    return pd.DataFrame(rows, columns=["tensor", "flat_index", *_KEYS, "row", "col", "score"])


def component_table(
    selection_frame, param_map: ParamMap, scores: Mapping[str, torch.Tensor] | None = None
) -> pd.DataFrame:
    """One row per (layer, component, expert): ``count`` of selected entries and ``share`` of the
    selection; with ``scores`` also ``entries``, ``score_sum``, ``score_mean``, ``score_max`` over
    all scored entries of the cell and ``score_share`` (its share of the total score mass)."""
    loc = located_frame(selection_frame, param_map)
    counts = loc.groupby(_KEYS).size().rename("count")
    table = counts.reset_index()
    if scores is not None:
        stats = pd.DataFrame(
            _score_cells(scores, param_map), columns=[*_KEYS, "entries", "score_sum", "score_max"]
        )
        stats = stats.groupby(_KEYS, as_index=False).agg(
            entries=("entries", "sum"), score_sum=("score_sum", "sum"), score_max=("score_max", "max")
        )
        table = stats.merge(table, on=_KEYS, how="outer")
        table["entries"] = table["entries"].fillna(0).astype(np.int64)
        table["score_mean"] = table["score_sum"] / table["entries"].where(table["entries"] > 0)
        total = float(table["score_sum"].sum())
        table["score_share"] = table["score_sum"] / total if total else 0.0
    table["count"] = table["count"].fillna(0).astype(np.int64)
    n = int(table["count"].sum())
    table["share"] = table["count"] / n if n else 0.0
    table["group"] = table["component"].map(group_of)
    first = [*_KEYS, "group", "count", "share"]
    table = table[first + [c for c in table.columns if c not in first]]
    return table.sort_values(_KEYS, kind="stable").reset_index(drop=True)


def group_ratios(table: pd.DataFrame) -> dict:
    """Shares of the selection (``topk``) and, if the table has scores, of the score mass
    (``score``) per group (attention, mlp, norm, embedding, router, other); plain floats."""
    groups = table["component"].map(group_of)
    out: dict = {"topk": _shares(table["count"].astype(float), groups), "score": None}
    if "score_sum" in table.columns:
        out["score"] = _shares(table["score_sum"].astype(float).fillna(0.0), groups)
    out["n_selected"] = int(table["count"].sum())
    return out


def per_head(selection_frame, param_map: ParamMap, config) -> pd.DataFrame:
    """Selected entries per attention head: layer, component, head, count, share.

    q/k/v rows map to heads with ``esa.params.head_of_row`` (k and v of grouped-query attention
    count key-value heads); o_proj entries map by input column (``col // head_dim``, query heads).
    Attention entries without a head (e.g. an output bias) have head -1, so the counts sum to the
    number of selected attention entries.
    """
    loc = located_frame(selection_frame, param_map)
    loc = loc[loc["component"].map(group_of) == "attention"]
    head_dim = _head_dim(config)
    heads = []
    for name, row, col, component in zip(loc["tensor"], loc["row"], loc["col"], loc["component"]):
        info = param_map[name]
        if component == "attn_o":
            head = col // head_dim if head_dim and len(info.shape) >= 2 else None
        else:
            head = head_of_row(info, int(row), config)
        heads.append(-1 if head is None else int(head))
    loc = loc.assign(head=heads)
    table = loc.groupby(["layer", "component", "head"]).size().rename("count").reset_index()
    n = int(table["count"].sum())
    table["share"] = table["count"] / n if n else 0.0
    return table


def head_sizes(param_map: ParamMap, config, names) -> pd.DataFrame:
    """Weights per attention head slice: layer, component, head, weights, over the attention tensors
    among ``names`` -- the cells `per_head` counts in, by the same row (q/k/v, fused too) and column
    (o_proj) mapping; attention entries without a head (e.g. an output bias) have head -1."""
    head_dim = _head_dim(config)
    sizes: dict[tuple[int, str, int], int] = {}
    for name in names:
        info = param_map[name]
        if group_of(info.component) != "attention":
            continue
        experts, layer = info.experts or 1, _layer(info)
        rows = info.shape[-2] if len(info.shape) >= 2 else info.shape[0]
        cols = info.shape[-1] if len(info.shape) >= 2 else 1
        if info.component == "attn_o" and head_dim and len(info.shape) >= 2:
            for col in range(cols):
                key = (layer, "attn_o", col // head_dim)
                sizes[key] = sizes.get(key, 0) + rows * experts
            continue
        if info.component == "attn_o":  # no head (a bias, or no head size in the config)
            sizes[(layer, "attn_o", -1)] = sizes.get((layer, "attn_o", -1), 0) + rows * cols * experts
            continue
        for row in range(rows):
            head = head_of_row(info, row, config)
            key = (layer, info.component_of_row(row), -1 if head is None else int(head))
            sizes[key] = sizes.get(key, 0) + cols * experts
    table = pd.DataFrame(
        [(*k, v) for k, v in sizes.items()], columns=["layer", "component", "head", "weights"]
    )
    return table.sort_values(["layer", "component", "head"], kind="stable").reset_index(drop=True)


def per_expert(
    selection_frame, param_map: ParamMap, scores: Mapping[str, torch.Tensor] | None = None
) -> pd.DataFrame:
    """Selected entries per MoE expert and per router row: layer, expert, part ("experts" for the
    expert weights, "router" for the router row of that expert), count, share (of the selection)
    and, with ``scores``, score_sum and score_share (of the total score mass of all scored tensors)."""
    loc = located_frame(selection_frame, param_map)
    loc = loc.assign(part=np.where(loc["component"] == "router", "router", "experts"))
    loc = loc[loc["expert"] >= 0]
    table = loc.groupby(["layer", "expert", "part"]).size().rename("count").reset_index()
    if scores is not None:
        cells = pd.DataFrame(
            _score_cells(scores, param_map), columns=[*_KEYS, "entries", "score_sum", "score_max"]
        )
        total = float(cells["score_sum"].sum())
        cells = cells[cells["expert"] >= 0]
        cells = cells.assign(part=np.where(cells["component"] == "router", "router", "experts"))
        mass = cells.groupby(["layer", "expert", "part"], as_index=False)["score_sum"].sum()
        table = mass.merge(table, on=["layer", "expert", "part"], how="outer")
        table["score_share"] = table["score_sum"] / total if total else 0.0
    table["count"] = table["count"].fillna(0).astype(np.int64)
    n = len(located_frame(selection_frame, param_map))
    table["share"] = table["count"] / n if n else 0.0
    return table.sort_values(["layer", "expert", "part"], kind="stable").reset_index(drop=True)


def compare_models(
    tables: Mapping[str, pd.DataFrame], value: str = "share", by: str = "component"
) -> pd.DataFrame:
    """Side by side: one column per model, one row per ``by`` (component or group), the sum of
    ``value`` (``share``, ``count``, ``score_share``...) over layers and experts; 0 where absent."""
    if not tables:
        raise ConfigError("compare_models needs at least one model's component_table")
    cols = {}
    for model, table in tables.items():
        if value not in table.columns:
            raise ConfigError(
                f"table of {model!r} has no column {value!r}; "
                "pass scores to component_table for score columns"
            )
        key = table["component"].map(group_of) if by == "group" else table[by]
        cols[model] = table[value].astype(float).groupby(key).sum()
    frame = pd.DataFrame(cols).fillna(0.0)
    frame.index.name = by
    return frame[list(tables)]


def heatmap(table: pd.DataFrame, value: str = "share", title: str | None = None):
    """Layer x component heatmap of ``value`` summed over experts (a matplotlib Figure, Agg);
    layer -1 holds the entries outside any layer."""
    if value not in table.columns:
        raise ConfigError(f"table has no column {value!r}; use one of {', '.join(map(str, table.columns))}")
    data = table[["layer", "component", value]].copy()
    data[value] = data[value].astype(float)
    return plot_layer_component_heatmap(
        data, value=value, title=title or f"{value} per layer x component", agg="sum"
    )


# --- helpers -----------------------------------------------------------------------------------


def _layer(info) -> int:
    return NO_LAYER if info.layer is None else int(info.layer)


def _expert(info, expert, row) -> int:
    if expert is not None:
        return int(expert)
    m = _EXPERT_OF_NAME.search(info.name)
    if m:
        return int(m.group(1))
    if info.component == "router":
        return int(row)
    return -1


def _shares(values: pd.Series, groups: pd.Series) -> dict:
    sums = values.groupby(groups).sum()
    total = float(values.sum())
    return {g: (float(sums.get(g, 0.0)) / total if total else 0.0) for g in GROUPS}


def _head_dim(config) -> int | None:
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return None
    return getattr(config, "head_dim", None) or hidden // heads


def _score_cells(scores: Mapping[str, torch.Tensor], param_map: ParamMap):
    """(layer, component, expert, entries, sum, max) per part of every scored tensor: fused
    tensors split by ``ParamInfo.parts`` (output rows), fused experts per expert, routers per row."""
    for name, score in scores.items():
        if name not in param_map:
            raise ConfigError(f"scored tensor {name!r} is not in the parameter map")
        info = param_map[name]
        s = score.detach()
        experts = info.experts or 1
        rows = info.shape[-2] if len(info.shape) >= 2 else info.shape[0]
        s = s.reshape(experts, rows, -1)
        if info.component == "router":  # one cell per expert row
            spans: list[tuple[int, int, str, int | None]] = [(r, r + 1, "router", r) for r in range(rows)]
        else:
            parts = info.parts or ((0, rows, info.component),)
            spans = [(a, b, comp, None) for a, b, comp in parts]
        for e in range(experts):
            for start, stop, comp, router_expert in spans:
                chunk = s[e, start:stop]
                if chunk.numel() == 0:
                    continue
                expert = (
                    router_expert
                    if router_expert is not None
                    else _expert(info, e if info.experts else None, 0)
                )
                yield (
                    _layer(info),
                    comp,
                    expert,
                    int(chunk.numel()),
                    float(chunk.sum(dtype=torch.float64)),
                    float(chunk.max()),
                )
