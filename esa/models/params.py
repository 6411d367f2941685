"""Parameter map: for every weight tensor its layer, component and the parts of fused tensors.

Components use one vocabulary across architectures so results group per layer / component:
``embed``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_o``, ``mlp_gate``, ``mlp_up``, ``mlp_down``,
``norm``, ``router``, ``lm_head`` (and ``other`` for anything unrecognised). Fused tensors
(GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj`` and ``gate_up_proj``, Mixtral's fused experts)
are split into their parts by output row, so ``locate`` names the part a weight belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_o")
MLP = ("mlp_gate", "mlp_up", "mlp_down")

# (regex on the parameter name's tail, component). First match wins.
_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(embed_tokens|embed_in|wte|word_embeddings)\.weight$", "embed"),
    (r"(lm_head|embed_out)\.weight$", "lm_head"),
    (r"(query_key_value|qkv_proj)\.(weight|bias)$", "attn_qkv"),  # before q/k/v: "qkv_proj" ends in "v_proj"
    (r"(q_proj|query)\.(weight|bias)$", "attn_q"),
    (r"(k_proj|key)\.(weight|bias)$", "attn_k"),
    (r"(v_proj|value)\.(weight|bias)$", "attn_v"),
    (r"(o_proj|attention\.dense|out_proj)\.(weight|bias)$", "attn_o"),
    (r"gate_up_proj(\.weight|\.bias)?$", "mlp_gate_up"),
    (r"(gate_proj|w1)\.(weight|bias)$", "mlp_gate"),
    (r"(up_proj|w3|dense_h_to_4h|fc1)\.(weight|bias)$", "mlp_up"),
    (r"(down_proj|w2|dense_4h_to_h|fc2)(\.weight|\.bias)?$", "mlp_down"),
    (r"mlp\.gate\.weight$|router\.weight$|block_sparse_moe\.gate\.weight$", "router"),
    (r"(norm|layernorm|ln_f|ln_\d)[^.]*\.(weight|bias)$", "norm"),
)
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter sits in the model.

    ``parts`` splits fused tensors by output row: ``(start_row, stop_row, component)`` ranges.
    ``experts`` is the number of experts for a fused 3-D expert tensor (dim 0), else 0.
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None
    component: str
    kind: str  # "matrix" | "embedding" | "norm" | "bias" | "router" | "lm_head"
    parts: tuple[tuple[int, int, str], ...] = ()
    experts: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def locate(self, flat_index: int) -> tuple[str, int | None, int, int]:
        """Map a flat index into ``(component, expert, row, col)``."""
        flat_index = int(flat_index)
        cols = self.shape[-1] if len(self.shape) >= 2 else 1
        rows = self.shape[-2] if len(self.shape) >= 2 else self.shape[0]
        expert = None
        if self.experts:
            expert, flat_index = divmod(flat_index, rows * cols)
        row, col = divmod(flat_index, cols) if len(self.shape) >= 2 else (flat_index, 0)
        return self.component_of_row(row), expert, row, col

    def component_of_row(self, row: int) -> str:
        """The component that output row ``row`` belongs to (parts of fused tensors)."""
        for start, stop, component in self.parts:
            if start <= row < stop:
                return component
        return self.component


@dataclass
class ParamMap:
    """Name -> ParamInfo for every parameter, in model order."""

    infos: dict[str, ParamInfo] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ParamInfo:
        return self.infos[name]

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def values(self):
        return self.infos.values()

    def scorable(self, include_embeddings: bool = False, include_norms: bool = False) -> list[str]:
        """Names of the tensors scored and selected by default: weight matrices (and optionally
        embeddings / lm_head, norms and biases)."""
        kinds = {"matrix", "router"}
        if include_embeddings:
            kinds |= {"embedding", "lm_head"}
        if include_norms:
            kinds |= {"norm", "bias"}
        return [n for n, info in self.infos.items() if info.kind in kinds]

    def num_layers(self) -> int:
        layers = [i.layer for i in self.infos.values() if i.layer is not None]
        return max(layers) + 1 if layers else 0


def build_param_map(model: torch.nn.Module) -> ParamMap:
    """Build the parameter map of a (transformers) causal LM."""
    config = getattr(model, "config", None)
    infos = {}
    for name, param in model.named_parameters():
        infos[name] = _describe(name, tuple(param.shape), config)
    return ParamMap(infos)


def _describe(name: str, shape: tuple[int, ...], config) -> ParamInfo:
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    component = "other"
    for pattern, comp in _PATTERNS:
        if re.search(pattern, name):
            component = comp
            break
    experts = shape[0] if ".experts." in name and len(shape) == 3 else 0
    parts: tuple[tuple[int, int, str], ...] = ()
    rows = shape[-2] if len(shape) >= 2 else shape[0]
    if component == "attn_qkv":
        parts = _qkv_parts(name, rows, config)
    elif component == "mlp_gate_up":
        half = rows // 2
        parts = ((0, half, "mlp_gate"), (half, rows, "mlp_up"))
    return ParamInfo(name, shape, layer, component, _kind(name, shape, component), parts, experts)


def _kind(name: str, shape: tuple[int, ...], component: str) -> str:
    if component == "embed":
        return "embedding"
    if component == "lm_head":
        return "lm_head"
    if component == "norm":
        return "norm"
    if component == "router":
        return "router"
    if len(shape) == 1 or name.endswith(".bias"):
        return "bias"
    return "matrix"


def _qkv_parts(name: str, rows: int, config) -> tuple[tuple[int, int, str], ...]:
    """Row ranges of q, k, v inside a fused qkv tensor."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        third = rows // 3
        return ((0, third, "attn_q"), (third, 2 * third, "attn_k"), (2 * third, rows, "attn_v"))
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if "query_key_value" in name:
        # GPT-NeoX interleaves per head: [q_h, k_h, v_h] for each head h.
        parts = []
        for h in range(rows // (3 * head_dim)):
            base = 3 * head_dim * h
            parts += [
                (base, base + head_dim, "attn_q"),
                (base + head_dim, base + 2 * head_dim, "attn_k"),
                (base + 2 * head_dim, base + 3 * head_dim, "attn_v"),
            ]
        return tuple(parts)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    return (
        (0, q_rows, "attn_q"),
        (q_rows, q_rows + kv_rows, "attn_k"),
        (q_rows + kv_rows, q_rows + 2 * kv_rows, "attn_v"),
    )


def head_of_row(info: ParamInfo, row: int, config) -> int | None:
    """Attention head of an output row of a q/k/v (or fused qkv) tensor, else None."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden or not info.component.startswith("attn_") or info.component == "attn_o":
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if "query_key_value" in info.name:
        return row // (3 * head_dim)
    for start, stop, _ in info.parts:
        if start <= row < stop:
            return (row - start) // head_dim
    return row // head_dim


def decoder_layers(model: torch.nn.Module, with_prefix: bool = False):
    """The repeated decoder blocks (the largest ``ModuleList``), and their name prefix."""
    best, best_name = None, ""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and (best is None or len(mod) > len(best)):
            best, best_name = mod, name
    layers = list(best) if best is not None else []
    return (layers, best_name) if with_prefix else layers
