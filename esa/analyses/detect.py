"""Super-weight detection (Yu et al. 2024, "The Super Weight in Large Language Models").

``detect_super_weights`` runs one forward pass on a short prompt with hooks on every layer's down
projection (the ``mlp_down`` tensors of the parameter map: Llama/Mistral/Phi-3 ``mlp.down_proj``,
GPT-NeoX ``mlp.dense_4h_to_h``, per-expert linear experts, and fused 3-D experts such as Mixtral's
``mlp.experts.down_proj``). Per layer it records the largest |input| and |output| activation over
all tokens. A layer whose maxima both exceed ``threshold`` and stand ``ratio`` times above the
median layer's maxima is a *spike layer*; every output channel of it that spikes the same way gives
a candidate super weight ``down_proj.weight[row = output channel, col = input channel with the
largest |input| at the token where that output channel peaks]``.

Fused experts are observed by replaying the routing: a forward hook on the experts module reads its
``(hidden_states, top_k_index)`` inputs and recomputes each expert's down-projection input
(``act(gate) * up``) and output for the tokens routed to it, so the statistics do not depend on
which experts kernel transformers dispatches to. Candidates there carry the expert index.

``super_activation_control`` is the paper's control: PPL with the super weight zeroed, and zeroed
with the *super activation* written back (see its docstring for exactly what is restored).
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.perturb import perturbed
from esa.select import Selection

log = logging.getLogger("esa")

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
_EXPERT_OF_NAME = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class LayerActivation:
    """Largest |input| and |output| of one layer's down projection(s) over all prompt tokens
    (``*_token``: position in the flattened ``input_ids``; ``expert``: the expert holding the
    output maximum, for MoE layers)."""

    layer: int
    module: str
    max_abs_input: float
    input_channel: int
    input_token: int
    max_abs_output: float
    output_channel: int
    output_token: int
    expert: int | None = None
    spike: bool = False


@dataclass
class SuperWeight:
    """A candidate super weight. ``row``/``col`` are the output/input channel of the down
    projection; ``flat_index`` addresses ``param.reshape(-1)`` (authoritative for any layout)."""

    layer: int
    param_name: str
    module: str
    row: int
    col: int
    expert: int | None
    flat_index: int
    weight: float
    input_activation: float
    output_activation: float
    token: int
    token_text: str | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


@dataclass
class SuperWeightReport:
    """What ``detect_super_weights`` saw: per-layer maxima, the spike rule and the candidates."""

    prompt: str | None
    n_tokens: int
    threshold: float
    ratio: float
    median_max_input: float
    median_max_output: float
    layers: list[LayerActivation]
    candidates: list[SuperWeight]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def spike_layers(self) -> list[int]:
        return [la.layer for la in self.layers if la.spike]

    @property
    def coordinates(self) -> dict[str, torch.Tensor]:
        """name -> sorted LongTensor of flat indices of the candidates (for ``perturbed``)."""
        out: dict[str, list[int]] = {}
        for c in self.candidates:
            out.setdefault(c.param_name, []).append(c.flat_index)
        return {n: torch.tensor(sorted(set(v)), dtype=torch.long) for n, v in out.items()}

    def selection(self) -> Selection:
        """The candidates as a real ``Selection`` (metric "super_weight", score = |output act|)."""
        return _selection_of(
            self.candidates,
            self.shapes,
            "super_weight",
            {(c.param_name, c.flat_index): abs(c.output_activation) for c in self.candidates},
        )

    def to_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("prompt", "n_tokens", "threshold", "ratio", "median_max_input", "median_max_output")
        }
        out["spike_layers"] = self.spike_layers
        out["layers"] = [asdict(la) for la in self.layers]
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out


@dataclass
class ControlResult:
    """PPL of the super-activation control (plain Python numbers)."""

    ppl_baseline: float
    ppl_zeroed: float
    ppl_restored: float
    nll_baseline: float
    nll_zeroed: float
    nll_restored: float
    positions: str
    spike_threshold: float
    n_restored: int
    n_positions: int
    candidates: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


# --- detection ---------------------------------------------------------------------------------


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
        if attr == "weight" and isinstance(mod, torch.nn.Linear):
            m = _EXPERT_OF_NAME.search(name + ".")
            sites.append(_Site(info.layer, mod_name, mod, name, "linear", int(m.group(1)) if m else None))
        elif attr == "down_proj" and len(info.shape) == 3 and hasattr(mod, "num_experts"):
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
    if input_ids is None:
        input_ids = default_input_ids(lm, prompt)
    else:
        prompt = None
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
    return _report(lm, records, input_ids, prompt, threshold, ratio, top)


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
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
    if index is None:
        raise ConfigError(
            f"cannot see the routing of {site.module_name} (no top_k_index input); "
            "super-weight detection of this experts module is not supported"
        )
    x = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(x.shape[0], -1)
    for e in range(mod.num_experts):
        rows = (index == e).any(-1).nonzero().squeeze(-1)
        if rows.numel():
            mid, y = expert_down_io(mod, e, x[rows])
            yield e, _summary(mid, y, rows)


def expert_down_io(mod, e: int, xe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of expert ``e``'s down projection for tokens ``xe`` (fused experts)."""
    has_gate = getattr(mod, "has_gate", hasattr(mod, "gate_up_proj"))
    transposed = getattr(mod, "is_transposed", False)
    has_bias = getattr(mod, "has_bias", False)

    def proj(inp, w, b):
        w = w.to(inp.dtype)
        res = inp @ w if transposed else torch.nn.functional.linear(inp, w)
        return res + b if has_bias and b is not None else res

    first = mod.gate_up_proj if has_gate else mod.up_proj
    bias = getattr(mod, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
    h = proj(xe, first[e], None if bias is None else bias[e])
    mid = mod._apply_gate(h) if has_gate else mod.act_fn(h)
    down_bias = getattr(mod, "down_proj_bias", None)
    return mid, proj(mid, mod.down_proj[e], None if down_bias is None else down_bias[e])


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
        if getattr(site.module, "is_transposed", False):
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


def _selection_of(candidates, shapes, metric, scores) -> Selection:
    indices: dict[str, list[int]] = {}
    for c in candidates:
        indices.setdefault(c.param_name, [])
        if c.flat_index not in indices[c.param_name]:
            indices[c.param_name].append(c.flat_index)
    idx = {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in indices.items()}
    vals = {
        n: torch.tensor([scores.get((n, int(i)), 0.0) for i in t], dtype=torch.float32)
        for n, t in idx.items()
    }
    return Selection(
        "top",
        "global",
        sum(t.numel() for t in idx.values()),
        0,
        metric,
        idx,
        vals,
        {n: tuple(shapes[n]) for n in idx if n in shapes},
    )


def candidate_selection(candidates: Sequence[SuperWeight], shapes: dict) -> Selection:
    """These candidates (e.g. just the strongest one) as a Selection for ``perturbed``."""
    return _selection_of(
        candidates,
        shapes,
        "super_weight",
        {(c.param_name, c.flat_index): abs(c.output_activation) for c in candidates},
    )


def random_weight_selection(lm, candidates: Sequence[SuperWeight], seed: int = 0) -> Selection:
    """One uniformly random entry of each candidate's tensor (never the candidate itself), seeded."""
    params = dict(lm.model.named_parameters())
    gen = torch.Generator().manual_seed(int(seed))
    picks, shapes = [], {}
    for c in candidates:
        numel = params[c.param_name].numel()
        flat = c.flat_index
        while flat == c.flat_index:
            flat = int(torch.randint(0, numel, (1,), generator=gen))
        shapes[c.param_name] = tuple(params[c.param_name].shape)
        picks.append(SuperWeight(c.layer, c.param_name, c.module, -1, -1, None, flat, 0.0, 0.0, 0.0, -1))
    return _selection_of(picks, shapes, f"random(seed={seed})", {})


# --- ranks -------------------------------------------------------------------------------------


def rank_under_metric(scores: dict[str, torch.Tensor], param_name: str, flat_index: int) -> int:
    """Rank of ``scores[param_name].reshape(-1)[flat_index]`` among all scored entries of all
    tensors: 1 + the number of entries strictly greater (streaming, tensor by tensor). A NaN
    score ranks after every non-NaN entry."""
    if param_name not in scores:
        raise ConfigError(f"{param_name!r} was not scored; score it (names=...) before ranking")
    flat = scores[param_name].detach().reshape(-1)
    if not 0 <= int(flat_index) < flat.numel():
        raise ConfigError(f"flat index {flat_index} out of range for {param_name!r} ({flat.numel()} entries)")
    value = float(flat[int(flat_index)])  # exact: every float dtype fits a Python float
    greater = 0
    for s in scores.values():
        s = s.detach().reshape(-1)
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()  # compare in a dtype that holds ``value`` exactly
        elif s.dtype == torch.float32 and flat.dtype == torch.float64:
            s = s.double()
        greater += int((~torch.isnan(s)).sum()) if value != value else int((s > value).sum())
    return greater + 1


# --- super-activation control ------------------------------------------------------------------


def super_activation_control(
    lm,
    candidate,
    eval_ids: torch.Tensor,
    *,
    positions: str = "spike",
    spike_threshold: float = 50.0,
    batch_size: int = 8,
    progress: bool = False,
) -> ControlResult:
    """PPL on ``eval_ids`` of the unperturbed model, with the super weight(s) zeroed, and zeroed with
    the super activation restored.

    ``candidate`` is a ``SuperWeight``, a list of them, or a ``SuperWeightReport``. The baseline
    pass records, per evaluation batch, the output of each candidate's module at the candidate's
    output channel (``row``) for every token: the down projection's output (dense), or the fused
    experts module's combined output (fused experts; the zeroed weight only changes its expert's
    contribution, so the combined channel restores exactly that). The restored pass zeroes the
    weight(s) with ``esa.perturb.perturbed`` and a forward hook writes those recorded values back
    into that output channel, at the positions where ``|recorded| >= spike_threshold``
    (``positions="spike"``: the super activation itself, the paper's control) or at every position
    (``positions="all"``: undoes the weight's whole effect, so PPL returns to the baseline exactly).
    """
    if positions not in ("spike", "all"):
        raise ConfigError(f"positions must be 'spike' or 'all', got {positions!r}")
    cands = _as_candidates(candidate)
    params = dict(lm.model.named_parameters())
    shapes = {c.param_name: tuple(params[c.param_name].shape) for c in cands}
    sel = _selection_of(cands, shapes, "super_weight", {})
    modules = dict(lm.model.named_modules())
    rows: dict[str, list[int]] = {}
    for c in cands:
        if c.row not in rows.setdefault(c.module, []):
            rows[c.module].append(c.row)
    recorded: dict[str, list[torch.Tensor]] = {m: [] for m in rows}

    def record(mod_name):
        def hook(mod, args, out):
            recorded[mod_name].append(out.reshape(-1, out.shape[-1])[:, rows[mod_name]].clone())

        return hook

    counts = {"restored": 0, "positions": 0}

    def restore(mod_name):
        calls = iter(recorded[mod_name])

        def hook(mod, args, out):
            try:
                rec = next(calls)
            except StopIteration:
                raise ConfigError("restore pass made more calls than the baseline pass") from None
            flat = out.reshape(-1, out.shape[-1]).clone()
            now = flat[:, rows[mod_name]]
            if now.shape != rec.shape:
                raise ConfigError("restore pass batch shapes differ from the baseline pass")
            mask = (
                torch.ones_like(rec, dtype=torch.bool) if positions == "all" else rec.abs() >= spike_threshold
            )
            flat[:, rows[mod_name]] = torch.where(mask, rec, now)
            counts["restored"] += int(mask.sum())
            counts["positions"] += int(mask.numel())
            return flat.reshape(out.shape)

        return hook

    def run(hook_factory=None):
        hooks = [modules[m].register_forward_hook(hook_factory(m)) for m in rows] if hook_factory else []
        try:
            return evaluate(lm.model, eval_ids, batch_size=batch_size, progress=progress)
        finally:
            for h in hooks:
                h.remove()

    base = run(record)
    with perturbed(lm.model, sel, "zero"):
        zeroed = run()
        restored = run(restore)
    return ControlResult(
        base.ppl,
        zeroed.ppl,
        restored.ppl,
        base.nll,
        zeroed.nll,
        restored.nll,
        positions,
        float(spike_threshold),
        counts["restored"],
        counts["positions"],
        [asdict(c) for c in cands],
    )


def _as_candidates(candidate) -> list[SuperWeight]:
    if isinstance(candidate, SuperWeightReport):
        cands = list(candidate.candidates)
    elif isinstance(candidate, SuperWeight):
        cands = [candidate]
    else:
        cands = list(candidate)
    if not cands or not all(isinstance(c, SuperWeight) for c in cands):
        raise ConfigError(
            "super_activation_control needs at least one SuperWeight candidate; "
            "run detect_super_weights first (it found none?)"
        )
    return cands
