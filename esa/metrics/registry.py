"""Sensitivity metrics: a registry (lm-evaluation-harness style) scoring every weight of a model.

``compute_scores(lm, metric, calib)`` returns ``{param name: float32 score tensor}`` (the
parameter's shape and device). The loss behind the gradient metrics is the mean next-token NLL over
all calibration windows (``esa.evaluate.lm_loss`` per batch, batches weighted by token count).

Built-in metrics (``list_metrics()``):

- ``magnitude``: |w|.
- ``grad_x_weight``: |w ⊙ g|, g the gradient of the mean calibration loss.
- ``grad_squared``: empirical Fisher diagonal, mean over batches of g_b² with g_b the gradient of
  batch b's mean loss; it depends on ``batch_size`` (``batch_size=1`` gives the per-window Fisher).
- ``act_mag`` (Wanda): |W_ij|·‖X_j‖₂, ‖X_j‖₂ the L2 norm of input channel j over all calibration
  tokens reaching that weight; fused 3-D experts get per-expert norms from the tokens routed to
  each expert (the routing is read from the experts module's inputs). The LM head, if asked
  for, sees the L-1 predicting positions of each window (the loss never feeds it the last one).
- ``hutchinson_diag``: |diag(H)| estimated as the mean of z ⊙ Hz over Rademacher z (seeded).
- ``hessian_diag``: |diag(H)| exactly, one Hessian-vector product per entry (small requests only).

The curvature metrics score by the magnitude of the diagonal (a negative diagonal is curvature
too); ``_signed_diag`` gives the signed values. They need double backward, so attention (and
fused-expert) kernels are switched to "eager" for their duration and restored after.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from esa.errors import ConfigError
from esa.evaluate import checkpointed, lm_loss
from esa.metrics import curvature as _curvature
from esa.models.params import decoder_layers

log = logging.getLogger("esa")

HESSIAN_MAX_ENTRIES = 20_000
SUMMARY_SAMPLE = 1_000_000
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MetricSpec:
    """A registry entry: ``fn(ctx: ScoreContext) -> {name: tensor}`` (any float dtype)."""

    name: str
    fn: Callable[[ScoreContext], dict]
    needs_grad: bool
    description: str
    needs_data: bool = True


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs_grad: bool, description: str, needs_data: bool = True):
    """Decorator registering ``fn(ctx) -> {param name: score}`` as metric ``name``."""

    def decorate(fn):
        METRICS[name] = MetricSpec(name, fn, needs_grad, description, needs_data)
        return fn

    return decorate


def list_metrics() -> list[dict]:
    """Registered metrics as plain dicts (name, needs_grad, description)."""
    return [
        {"name": s.name, "needs_grad": s.needs_grad, "description": s.description} for s in METRICS.values()
    ]


@dataclass
class ScoreContext:
    """What a metric function gets: the model, the requested parameters and the options."""

    lm: object
    names: list[str]
    params: list[torch.nn.Parameter]
    calib: torch.Tensor | None
    seed: int = 0
    batch_size: int = 4
    hutchinson_samples: int = 8
    max_entries: int = HESSIAN_MAX_ENTRIES
    progress: bool = True
    desc: str = "score"
    score_dtype: torch.dtype = torch.float32
    checkpoint: bool | None = None  # activation checkpointing for first-order gradients (None: auto)
    options: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    def items(self):
        return zip(self.names, self.params)

    @property
    def n_batches(self) -> int:
        return math.ceil(self.calib.shape[0] / self.batch_size)

    def loss_terms(self, weighted: bool = True) -> Iterator[Callable[[], torch.Tensor]]:
        """One loss callable per calibration batch (with a progress bar): the batch's mean NLL,
        times its share of all tokens when ``weighted`` (so the terms sum to the overall mean)."""
        n, _length = self.calib.shape
        device = self.model.get_input_embeddings().weight.device
        calib = self.calib.to(device, non_blocking=True)
        ckpt = bool(self.options.get("_checkpointing"))
        starts = range(0, n, self.batch_size)
        for i in tqdm(starts, desc=self.desc, disable=not self.progress, leave=False, unit="batch"):
            batch = calib[i : i + self.batch_size]
            weight = batch.shape[0] / n if weighted else 1.0
            yield lambda b=batch, w=weight: lm_loss(self.model, b, checkpoint=ckpt) * w

    @contextlib.contextmanager
    def first_order(self):
        """Activation checkpointing (decoder layers and loss chunks) for a first-order gradient
        pass when ``checkpoint`` is True, or when None (auto) and the model is on CUDA."""
        on = self.checkpoint if self.checkpoint is not None else _needs_checkpointing(self)
        self.options["_checkpointing"] = on
        try:
            with checkpointed(self.model, on):
                yield on
        finally:
            self.options.pop("_checkpointing", None)

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """Accumulators are held in the score dtype when it is narrower than fp32 (lean mode)."""
        return self.score_dtype if self.score_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _needs_checkpointing(ctx: ScoreContext) -> bool:
    """Auto policy: checkpoint first-order passes on CUDA (activations then cost one layer input
    per layer instead of every intermediate: the 8B scoring pass fits in 40 GB); not on the CPU,
    where memory is rarely the limit and the recomputation would only cost time."""
    device = ctx.model.get_input_embeddings().weight.device
    return device.type == "cuda" and bool(decoder_layers(ctx.model))


def compute_scores(
    lm,
    metric: str,
    calib: torch.Tensor | None,
    *,
    seed: int = 0,
    batch_size: int = 4,
    hutchinson_samples: int = 8,
    names=None,
    progress: bool = True,
    score_dtype: torch.dtype = torch.float32,
    max_entries: int = HESSIAN_MAX_ENTRIES,
    checkpoint: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Score the ``names`` parameters of ``lm`` (default ``lm.param_map.scorable()``) by ``metric``
    on calibration windows ``calib`` ``[n, L]``; returns name -> score (param shape and device).

    Scores are built in place in ``score_dtype``: fp32 (default) costs 4 bytes per scored weight;
    bf16 halves that and also accumulates the gradient metrics in bf16 (lean mode, for models
    whose fp32 scores do not fit beside the weights). ``checkpoint`` switches activation
    checkpointing of first-order gradient passes on/off (None: on when memory asks for it).
    """
    spec = _spec(metric)
    ctx = _context(
        lm,
        spec,
        calib,
        names,
        seed=seed,
        batch_size=batch_size,
        hutchinson_samples=hutchinson_samples,
        progress=progress,
        max_entries=max_entries,
        desc=f"score {metric}",
        score_dtype=score_dtype,
        checkpoint=checkpoint,
    )
    raw = _run(ctx, spec.fn, spec.needs_grad)
    out = {}
    for n, p in ctx.items():
        out[n] = raw.pop(n).detach().to(device=p.device, dtype=score_dtype)
    return out


def _spec(metric: str) -> MetricSpec:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return METRICS[metric]


def _context(lm, spec: MetricSpec, calib, names, **options) -> ScoreContext:
    named = dict(lm.model.named_parameters())
    names = list(dict.fromkeys(lm.param_map.scorable() if names is None else names))
    missing = [n for n in names if n not in named]
    if missing:
        raise ConfigError(f"unknown parameter name(s) {missing[:3]}: use names from lm.param_map")
    if not names:
        raise ConfigError("no parameters to score: pass names=[...] with at least one parameter")
    if spec.needs_data:
        calib = _check_calib(calib)
        if options["batch_size"] < 1:
            raise ConfigError(f"batch_size={options['batch_size']} must be >= 1")
    return ScoreContext(lm, names, [named[n] for n in names], calib, **options)


def _check_calib(calib) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
        raise ConfigError(
            "calibration windows must be a LongTensor [n, L] with n >= 1 and L >= 2: "
            "use DataBundle.calibration(n, seed)"
        )
    if calib.dtype != torch.long:
        raise ConfigError(f"calibration windows must hold token ids (torch.long), not {calib.dtype}")
    return calib


def _run(ctx: ScoreContext, fn, needs_grad: bool) -> dict:
    with _curvature.grad_scope(ctx.model, ctx.params if needs_grad else []):
        return fn(ctx)


def _signed_diag(lm, calib, which: str = "hutchinson", **options) -> dict[str, torch.Tensor]:
    """Signed diag(H) estimates (``which`` = "hutchinson" or "exact"); options as compute_scores."""
    fn = {"hutchinson": _hutchinson_signed, "exact": _hessian_signed}[which]
    spec = METRICS["hutchinson_diag" if which == "hutchinson" else "hessian_diag"]
    defaults = dict(
        seed=0,
        batch_size=4,
        hutchinson_samples=8,
        progress=False,
        max_entries=HESSIAN_MAX_ENTRIES,
        desc=f"signed {which}",
    )
    names = options.pop("names", None)
    ctx = _context(lm, spec, calib, names, **{**defaults, **options})
    return _run(ctx, fn, True)


# --- metrics --------------------------------------------------------------------------------


@register_metric("magnitude", needs_grad=False, needs_data=False, description="|w|")
def _magnitude(ctx: ScoreContext) -> dict:
    return {n: p.detach().to(ctx.score_dtype, copy=True).abs_() for n, p in ctx.items()}


@register_metric(
    "grad_x_weight", needs_grad=True, description="|w * g|, g the gradient of the mean calibration loss"
)
def _grad_x_weight(ctx: ScoreContext) -> dict:
    with ctx.first_order():
        grads = _curvature.gradient_pass(ctx.loss_terms(), ctx.params, dtype=ctx.accumulate_dtype)
    return {n: g.mul_(p.detach()).abs_() for (n, p), g in zip(ctx.items(), grads)}


@register_metric(
    "grad_squared",
    needs_grad=True,
    description="empirical Fisher diagonal: mean over batches of the squared batch "
    "gradient (depends on batch_size; 1 = per-window Fisher)",
)
def _grad_squared(ctx: ScoreContext) -> dict:
    with ctx.first_order():
        sums = _curvature.gradient_pass(
            ctx.loss_terms(weighted=False), ctx.params, square=True, dtype=ctx.accumulate_dtype
        )
    return {n: s.div_(ctx.n_batches) for n, s in zip(ctx.names, sums)}


def _hutchinson_signed(ctx: ScoreContext) -> dict:
    with _curvature.eager_kernels(ctx.model):
        est = _curvature.hutchinson_diag(ctx.loss_terms(), ctx.params, ctx.hutchinson_samples, ctx.seed)
    return dict(zip(ctx.names, est))


def _hessian_signed(ctx: ScoreContext) -> dict:
    total = sum(p.numel() for p in ctx.params)
    if total > ctx.max_entries:  # refuse before any forward pass
        raise ConfigError(
            f"hessian_diag is exact and costs one Hessian-vector product per weight: {total} entries "
            f"> limit {ctx.max_entries}; restrict names=... or use hutchinson_diag"
        )
    with _curvature.eager_kernels(ctx.model):
        diag = _curvature.hessian_diag(ctx.loss_terms(), ctx.params, ctx.max_entries)
    return dict(zip(ctx.names, diag))


@register_metric(
    "hutchinson_diag",
    needs_grad=True,
    description="|diag(H)| by Hutchinson: mean of z*Hz over seeded Rademacher z",
)
def _hutchinson(ctx: ScoreContext) -> dict:
    return {n: v.abs_() for n, v in _hutchinson_signed(ctx).items()}


@register_metric(
    "hessian_diag",
    needs_grad=True,
    description=f"|diag(H)| exactly, one HVP per weight (<= {HESSIAN_MAX_ENTRIES} entries)",
)
def _hessian(ctx: ScoreContext) -> dict:
    return {n: v.abs_() for n, v in _hessian_signed(ctx).items()}


@register_metric(
    "act_mag",
    needs_grad=False,
    description="Wanda: |W_ij| * L2 norm of input channel j over calibration tokens",
)
def _act_mag(ctx: ScoreContext) -> dict:
    modules = dict(ctx.model.named_modules())
    plan, owners = {}, {}
    for name, p in ctx.items():
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        kind = ctx.lm.param_map[name].kind if name in ctx.lm.param_map else None
        if attr == "weight" and p.ndim == 2 and (isinstance(mod, torch.nn.Linear) or kind == "router"):
            plan[name] = (mod_name, "linear")
        elif p.ndim == 3 and attr in _EXPERT_PARAMS and hasattr(mod, "num_experts"):
            plan[name] = (mod_name, "mid" if attr == "down_proj" else "in")
        else:
            raise ConfigError(
                f"act_mag needs weights read by a linear layer: {name} "
                f"({type(mod).__name__}, shape {tuple(p.shape)}) is not one; "
                "drop it from names= or use another metric"
            )
        owners.setdefault(mod_name, (mod, set()))[1].add(plan[name][1])
    sums: dict[tuple[str, str], torch.Tensor] = {}
    hooks = []
    try:
        for mod_name, (mod, parts) in owners.items():
            hook = _linear_hook if "linear" in parts else _experts_hook(mod, "mid" in parts)
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, kw, out, k=mod_name, h=hook: h(m, a, kw, sums, k), with_kwargs=True
                )
            )
        with torch.inference_mode():
            for term in ctx.loss_terms():
                term()
    finally:
        for h in hooks:
            h.remove()
    return {n: _wanda(n, p, plan[n], sums, ctx.model) for n, p in ctx.items()}


def _accumulate(sums, key, value) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def _linear_hook(mod, args, kwargs, sums, key) -> None:
    x = args[0] if args else next(iter(kwargs.values()))
    n_in = mod.weight.shape[1]
    if x.shape[-1] != n_in:
        raise ConfigError(
            f"act_mag: {key} reads inputs of width {x.shape[-1]}, not its weight's "
            f"{n_in} columns; drop it from names= or use another metric"
        )
    _accumulate(sums, (key, "linear"), x.detach().reshape(-1, n_in).float().pow(2).sum(0))


def _experts_hook(mod, want_mid: bool):
    """Per-expert Σx² of the tokens routed to each expert (and of their gated activations, the
    input of down_proj), replaying the routing from the experts module's (hidden, top_k_index)."""
    has_gate = getattr(mod, "has_gate", hasattr(mod, "gate_up_proj"))
    transposed = getattr(mod, "is_transposed", False)

    def hook(mod, args, kwargs, sums, key) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        if index is None:
            raise ConfigError(
                f"act_mag: cannot see the routing of {key} (no top_k_index input): "
                "drop its expert tensors from names= or use another metric"
            )
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        index = index.reshape(x.shape[0], -1)
        first = mod.gate_up_proj if has_gate else mod.up_proj
        bias = getattr(mod, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
        s_in = torch.zeros(mod.num_experts, x.shape[1], dtype=torch.float32, device=x.device)
        s_mid = None
        for e in range(mod.num_experts):
            count = (index == e).sum(-1)  # a token routed twice to e is processed twice
            rows = count.nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            xe, ce = x[rows], count[rows, None].float()
            s_in[e] = (ce * xe.float().pow(2)).sum(0)
            if want_mid:
                w = first[e].to(xe.dtype)
                out = xe @ w if transposed else torch.nn.functional.linear(xe, w)
                if getattr(mod, "has_bias", False) and bias is not None:
                    out = out + bias[e]
                act = mod._apply_gate(out) if has_gate else mod.act_fn(out)
                if s_mid is None:
                    s_mid = torch.zeros(mod.num_experts, act.shape[-1], dtype=torch.float32, device=x.device)
                s_mid[e] = (ce * act.float().pow(2)).sum(0)
        _accumulate(sums, (key, "in"), s_in)
        if s_mid is not None:
            _accumulate(sums, (key, "mid"), s_mid)

    return hook


def _wanda(name: str, p: torch.Tensor, plan, sums, model) -> torch.Tensor:
    mod_name, part = plan
    w = p.detach().abs().float()
    if (mod_name, part) not in sums:
        log.warning("esa: act_mag saw no input reaching %s; its scores are 0", name)
        return torch.zeros_like(w)
    norm = sums[(mod_name, part)].sqrt().to(w.device)
    if part == "linear":
        return w * norm[None, :]
    transposed = getattr(model.get_submodule(mod_name), "is_transposed", False)
    if norm.shape[1] != w.shape[1 if transposed else 2]:
        raise ConfigError(
            f"act_mag: unexpected layout of {name} {tuple(p.shape)}: "
            "drop it from names= or use another metric"
        )
    return w * (norm[:, :, None] if transposed else norm[:, None, :])


# --- summaries ------------------------------------------------------------------------------


def score_summary(scores: dict[str, torch.Tensor], sample: int = SUMMARY_SAMPLE, seed: int = 0) -> dict:
    """Plain-number summary: entries, max, mean exactly; median, p99, top-1% mean and
    ``concentration`` = top-1% mean / median from a seeded sample of at most ``sample`` values."""
    tensors = [s.detach().reshape(-1) for s in scores.values() if s.numel()]
    entries = sum(t.numel() for t in tensors)
    if entries == 0:
        raise ConfigError("score_summary needs at least one score: compute_scores returned none")
    gen = torch.Generator().manual_seed(int(seed))
    parts = []
    for t in tensors:
        if entries <= sample:
            parts.append(t.float().cpu())
        else:
            k = max(1, round(sample * t.numel() / entries))
            idx = torch.randint(0, t.numel(), (k,), generator=gen)
            parts.append(t[idx.to(t.device)].float().cpu())
    vals = torch.cat(parts)
    median = float(torch.quantile(vals, 0.5))
    top = torch.topk(vals, max(1, math.ceil(0.01 * vals.numel()))).values
    top_mean = float(top.mean())
    if median > 0:
        concentration = top_mean / median
    else:
        concentration = math.inf if top_mean > 0 else math.nan
    return {
        "tensors": len(tensors),
        "entries": int(entries),
        "sampled": int(vals.numel()),
        "max": max(float(t.max()) for t in tensors),
        "mean": sum(float(t.double().sum()) for t in tensors) / entries,
        "median": median,
        "p99": float(torch.quantile(vals, 0.99)),
        "top1pct_mean": top_mean,
        "concentration": concentration,
        "finite": all(bool(torch.isfinite(t).all()) for t in tensors),
    }
