"""Super-weight detection (Yu et al. 2024, "The Super Weight in Large Language Models").

``detect_super_weights`` runs one forward pass on a short prompt with hooks on every layer's down
projection (the ``mlp_down`` tensors of the parameter map: Llama/Mistral/Phi-3 ``mlp.down_proj``,
GPT-NeoX ``mlp.dense_4h_to_h``, per-expert linear experts, and fused 3-D experts such as Mixtral's
``mlp.experts.down_proj``). Per layer it records the largest |input| and |output| activation over
all tokens. A layer whose maxima both exceed ``threshold`` and stand ``ratio`` times above the
median layer's maxima is a *spike layer*; every output channel of it that spikes the same way gives
a candidate super weight ``down_proj.weight[row = output channel, col = input channel with the
largest |input| at the token where that output channel peaks]``.

Fused experts are observed by replaying the routing (``esa.models.moe``): a forward hook on the
experts module reads its ``(hidden_states, top_k_index)`` inputs and recomputes each expert's
down-projection input (``act(gate) * up``) and output for the tokens routed to it, so the
statistics do not depend on which experts kernel transformers dispatches to. Candidates there carry
the expert index.

The report types live in ``esa.analyses.detect_report``, the controls (ranks, a random weight,
the super-activation control) in ``esa.analyses.detect_controls``; both are importable from here.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import torch

from esa.analyses.detect_controls import (
    ControlResult,
    random_weight_selection,
    rank_under_metric,
    super_activation_control,
)
from esa.analyses.detect_report import (
    LayerActivation,
    SuperWeight,
    SuperWeightReport,
    candidate_selection,
)
from esa.errors import ConfigError
from esa.models import moe

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
_EXPERT_OF_NAME = re.compile(r"\.experts\.(\d+)\.")

__all__ = [
    "DEFAULT_PROMPT",
    "ControlResult",
    "LayerActivation",
    "SuperWeight",
    "SuperWeightReport",
    "candidate_selection",
    "default_input_ids",
    "detect_super_weights",
    "down_proj_sites",
    "random_weight_selection",
    "rank_under_metric",
    "super_activation_control",
]


@dataclass
class _Site:
    layer: int
    module_name: str
    module: torch.nn.Module
    param_name: str
    kind: str  # "linear" | "experts"
    expert: int | None = None  # per-expert linear modules


def down_proj_sites(lm) -> list[_Site]:
    """The down-projection modules of ``lm`` (from its parameter map), in model order."""
    modules = dict(lm.model.named_modules())
    sites = []
    for name, info in lm.param_map.infos.items():
        if info.component != "mlp_down" or info.layer is None:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None:
            continue
        if attr == "weight" and isinstance(mod, torch.nn.Linear):
            m = _EXPERT_OF_NAME.search(name + ".")
            sites.append(_Site(info.layer, mod_name, mod, name, "linear", int(m.group(1)) if m else None))
        elif attr == "down_proj" and len(info.shape) == 3 and moe.is_fused_experts(mod):
            sites.append(_Site(info.layer, mod_name, mod, name, "experts"))
    return sites


def default_input_ids(lm, prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    """``prompt`` tokenized with ``lm.tokenizer`` (its default special tokens, e.g. a BOS), [1, T]."""
    ids = lm.tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def detect_super_weights(
    lm,
    input_ids: torch.Tensor | None = None,
    *,
    threshold: float = 50.0,
    top: int = 3,
    ratio: float = 10.0,
    prompt: str = DEFAULT_PROMPT,
) -> SuperWeightReport:
    """Find super-weight candidates of ``lm`` from one forward pass (see the module doc).

    ``input_ids`` defaults to ``prompt`` (:data:`DEFAULT_PROMPT`, "Apple Inc. is a worldwide tech
    company.", the paper's example) tokenized by ``lm.tokenizer``. A candidate needs |output| and
    |input| > ``threshold`` and >= ``ratio`` x the median layer maximum; at most ``top`` candidates
    (largest |output| first) are kept, then listed in layer order.
    """
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}; pass e.g. top=3")
    sites = down_proj_sites(lm)
    if not sites:
        raise ConfigError(
            f"no down-projection found in {lm.name!r}: super-weight detection needs an "
            "MLP down projection (down_proj / dense_4h_to_h / fused experts)"
        )
    shown: str | None = prompt if input_ids is None else None
    if input_ids is None:
        input_ids = default_input_ids(lm, prompt)
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    records: list[tuple[_Site, int | None, dict]] = []
    hooks = []
    try:
        for site in sites:
            fn = _experts_stats if site.kind == "experts" else _linear_stats
            hooks.append(
                site.module.register_forward_hook(
                    lambda m, a, kw, out, s=site, f=fn: records.extend(
                        (s, e, r) for e, r in f(m, a, kw, out, s)
                    ),
                    with_kwargs=True,
                )
            )
        device = lm.model.get_input_embeddings().weight.device
        with torch.inference_mode():
            lm.model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return _report(lm, records, input_ids, shown, threshold, ratio, top)


def _summary(x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor | None) -> dict:
    """Per-token input maxima and per-channel output maxima of x [n, in], y [n, out]."""
    x, y = x.detach().float(), y.detach().float()
    in_val, in_ch = x.abs().max(dim=-1)
    out_val, out_tok = y.abs().max(dim=0)
    tokens = torch.arange(x.shape[0]) if tokens is None else tokens.cpu()
    return {
        "tokens": tokens,
        "in_val": in_val.cpu(),
        "in_ch": in_ch.cpu(),
        "in_signed": x.gather(1, in_ch[:, None]).squeeze(1).cpu(),
        "out_val": out_val.cpu(),
        "out_tok": out_tok.cpu(),
        "out_signed": y.gather(0, out_tok[None]).squeeze(0).cpu(),
    }


def _linear_stats(mod, args, kwargs, out, site):
    x = args[0] if args else next(iter(kwargs.values()))
    yield site.expert, _summary(x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]), None)


def _experts_stats(mod, args, kwargs, out, site):
    routed = moe.routing(args, kwargs)
    if routed is None:
        raise ConfigError(
            f"cannot see the routing of {site.module_name} (no top_k_index input); "
            "super-weight detection of this experts module is not supported"
        )
    for t in moe.routed_tokens(mod, *routed):
        yield t.expert, _summary(t.mid, t.out, t.rows)


def _report(lm, records, input_ids, prompt, threshold, ratio, top) -> SuperWeightReport:
    if not records:
        raise ConfigError(f"no down projection of {lm.name!r} ran in the forward pass")
    per_layer: dict[int, LayerActivation] = {}
    for site, expert, r in records:
        i_tok = int(r["in_val"].argmax())
        o_ch = int(r["out_val"].argmax())
        la = LayerActivation(
            site.layer,
            site.module_name,
            float(r["in_val"][i_tok]),
            int(r["in_ch"][i_tok]),
            int(r["tokens"][i_tok]),
            float(r["out_val"][o_ch]),
            o_ch,
            int(r["tokens"][r["out_tok"][o_ch]]),
            expert,
        )
        old = per_layer.get(site.layer)
        if old is None:
            per_layer[site.layer] = la
        else:  # several modules/experts per layer: keep each maximum with its own location
            if la.max_abs_output > old.max_abs_output:
                old.max_abs_output, old.output_channel, old.output_token = (
                    la.max_abs_output,
                    la.output_channel,
                    la.output_token,
                )
                old.expert, old.module = la.expert, la.module
            if la.max_abs_input > old.max_abs_input:
                old.max_abs_input, old.input_channel, old.input_token = (
                    la.max_abs_input,
                    la.input_channel,
                    la.input_token,
                )
    layers = [per_layer[k] for k in sorted(per_layer)]
    med_in = float(statistics.median(la.max_abs_input for la in layers))
    med_out = float(statistics.median(la.max_abs_output for la in layers))
    lim_in, lim_out = max(threshold, ratio * med_in), max(threshold, ratio * med_out)
    for la in layers:
        la.spike = la.max_abs_input > lim_in and la.max_abs_output > lim_out
    spiking = {la.layer for la in layers if la.spike}
    found: dict[tuple[str, int], SuperWeight] = {}
    tokens = input_ids.reshape(-1).tolist()
    for site, expert, r in records:
        if site.layer not in spiking:
            continue
        for ch in (r["out_val"] > lim_out).nonzero().flatten().tolist():
            t = int(r["out_tok"][ch])
            if float(r["in_val"][t]) <= lim_in:
                continue
            cand = _candidate(
                lm,
                site,
                expert,
                ch,
                int(r["in_ch"][t]),
                float(r["in_signed"][t]),
                float(r["out_signed"][ch]),
                int(r["tokens"][t]),
                tokens,
            )
            prev = found.get((cand.param_name, cand.flat_index))
            if prev is None or abs(cand.output_activation) > abs(prev.output_activation):
                found[(cand.param_name, cand.flat_index)] = cand
    best = sorted(found.values(), key=lambda c: -abs(c.output_activation))[:top]
    best.sort(key=lambda c: (c.layer, -abs(c.output_activation)))
    params = dict(lm.model.named_parameters())
    shapes = {c.param_name: tuple(params[c.param_name].shape) for c in best}
    return SuperWeightReport(
        prompt, int(input_ids.numel()), float(threshold), float(ratio), med_in, med_out, layers, best, shapes
    )


def _candidate(lm, site, expert, row, col, x_in, y_out, token, tokens) -> SuperWeight:
    param = dict(lm.model.named_parameters())[site.param_name]
    if site.kind == "experts":
        per = param.shape[1] * param.shape[2]
        if moe.is_transposed(site.module):
            flat = expert * per + col * param.shape[2] + row
        else:
            flat = expert * per + row * param.shape[2] + col
    else:
        flat = row * param.shape[1] + col
    text = None
    if 0 <= token < len(tokens) and hasattr(lm.tokenizer, "convert_ids_to_tokens"):
        text = str(lm.tokenizer.convert_ids_to_tokens(int(tokens[token])))
    return SuperWeight(
        site.layer,
        site.param_name,
        site.module_name,
        int(row),
        int(col),
        None if expert is None else int(expert),
        int(flat),
        float(param.detach().reshape(-1)[flat]),
        x_in,
        y_out,
        token,
        text,
    )
