"""Sensitivity metrics registry (lm-evaluation-harness style): score every weight of a model.

``compute_scores(lm, metric, calib)`` returns ``{param name: float32 score tensor}`` (the
parameter's shape and device). The loss behind the gradient metrics is the mean next-token NLL over
all calibration windows (``esa.evaluate.lm_loss`` per batch, batches weighted by token count).

A metric is a function ``fn(ctx: ScoreContext) -> {name: tensor}`` registered with
``@register_metric``; the built-in families register themselves when ``esa.metrics`` is imported:

- ``esa.metrics.gradient``: ``magnitude`` |w|, ``grad_x_weight`` |w ⊙ g|, ``grad_squared``
  (empirical Fisher diagonal).
- ``esa.metrics.activation``: ``act_mag`` (Wanda) |W_ij|·‖X_j‖₂.
- ``esa.metrics.curvature``: ``hutchinson_diag`` and ``hessian_diag``, |diag(H)|.

``score_summary`` condenses scores to plain numbers.

Memory (``esa.metrics.accumulate``): on CUDA a first-order pass measures its activations (one
window's forward, once per model and window length) and runs without activation checkpointing when
the accumulators and activations fit under ``memory_limit`` (default: the device's free memory),
else with it, else also with some accumulators (spread over the model) in pinned host memory,
updated through the GPU: the same fp32 sums, bit for bit, and those scores returned on the CPU.
The curvature metrics plan the same way (``esa.metrics.probes.curvature_plan``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from esa.errors import ConfigError
from esa.evaluate import checkpointed, lm_loss
from esa.metrics.accumulate import ACT_MARGIN, MemoryPlan, available_bytes, host_scores, plan_memory
from esa.models.params import decoder_layers

LossTerms = Iterable[Callable[[], torch.Tensor]]  # zero-argument callables, one loss term each

HESSIAN_MAX_ENTRIES = 20_000
SUMMARY_SAMPLE = 1_000_000


@dataclass(frozen=True)
class MetricSpec:
    """A registry entry: ``fn(ctx: ScoreContext) -> {name: tensor}`` (any float dtype)."""

    name: str
    fn: Callable[[ScoreContext], dict]
    needs_grad: bool
    description: str
    needs_data: bool = True
    version: int = 1  # bump when the definition changes: cached scores of older versions are misses


METRICS: dict[str, MetricSpec] = {}


def register_metric(
    name: str, *, needs_grad: bool, description: str, needs_data: bool = True, version: int = 1
):
    """Decorator registering ``fn(ctx) -> {param name: score}`` as metric ``name``; ``version``
    is part of the score cache key (bump it when the metric's definition changes)."""

    def decorate(fn):
        METRICS[name] = MetricSpec(name, fn, needs_grad, description, needs_data, version)
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

    lm: Any  # a LoadedModel
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
    offload: bool | None = None  # host memory for accumulators/scores: True all, False none, None: as needed
    memory_limit: int | None = None  # device bytes the pass may peak at (None: what is free)
    hutchinson_method: str | None = None  # "tangent", "lean" or "retained" (None: as planned)
    options: dict = field(default_factory=dict)

    @property
    def model(self) -> Any:  # a transformers model
        return self.lm.model

    def items(self):
        return zip(self.names, self.params)

    @property
    def windows(self) -> torch.Tensor:
        """The calibration windows [n, L] (metrics with ``needs_data`` only)."""
        if self.calib is None:
            raise ConfigError("this metric needs calibration windows: pass calib=[n, L] token ids")
        return self.calib

    def placed_scores(self, make: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: make(name, param)} for metrics that build each score at once (no accumulators):
        each cast to ``score_dtype`` as it is made, and moved to host memory for the positions
        ``host_scores`` picks (the plan's offload, so ``compute_scores`` returns them on the CPU)."""
        host = host_scores(self.params, self.score_dtype, self.offload, self.memory_limit)
        self.options["plan"] = MemoryPlan(False, host, "scores in host memory" if host else "")
        out = {}
        for i, (n, p) in enumerate(self.items()):
            score = make(n, p).to(self.score_dtype)
            out[n] = score.cpu() if i in host else score
        return out

    @property
    def n_batches(self) -> int:
        return math.ceil(self.windows.shape[0] / self.batch_size)

    def loss_terms(self, weighted: bool = True) -> Iterator[Callable[[], torch.Tensor]]:
        """One loss callable per calibration batch (with a progress bar): the batch's mean NLL,
        times its share of all tokens when ``weighted`` (so the terms sum to the overall mean)."""
        n, _length = self.windows.shape
        device = self.model.get_input_embeddings().weight.device
        calib = self.windows.to(device, non_blocking=True)
        ckpt = bool(self.options.get("_checkpointing"))
        starts = range(0, n, self.batch_size)
        for i in tqdm(starts, desc=self.desc, disable=not self.progress, leave=False, unit="batch"):
            batch = calib[i : i + self.batch_size]
            weight = batch.shape[0] / n if weighted else 1.0
            yield partial(_weighted_loss, self.model, batch, weight, ckpt)

    @contextlib.contextmanager
    def first_order(self):
        """The block of a first-order gradient pass: yields its ``MemoryPlan`` (activation
        checkpointing of decoder layers and loss chunks, offloaded accumulators), decided by
        ``memory_plan`` for this context's batch size; ``options["plan"]`` keeps it afterwards."""
        plan = self.memory_plan()
        self.options["_checkpointing"] = plan.checkpoint
        self.options["plan"] = plan
        try:
            with checkpointed(self.model, plan.checkpoint):
                yield plan
        finally:
            self.options.pop("_checkpointing", None)

    def memory_plan(self) -> MemoryPlan:
        """On one CUDA device: ``plan_memory`` over this pass's accumulators (``accumulate_dtype``)
        and measured activations. Elsewhere (CPU, a model split over devices): checkpointing as
        ``checkpoint`` says (default on for split CUDA models, off on the CPU), offload only when
        forced."""
        devices = {p.device for p in self.params}
        device = next(iter(devices))
        if len(devices) > 1 or device.type != "cuda":
            on = self.checkpoint if self.checkpoint is not None else device.type == "cuda"
            every = frozenset(range(len(self.params))) if self.offload else frozenset()
            return MemoryPlan(bool(on and decoder_layers(self.model)), every, "not a single CUDA device")
        size = torch.tensor([], dtype=self.accumulate_dtype).element_size()
        return plan_memory(
            [p.numel() * size for p in self.params],
            available_bytes(device, self.memory_limit),
            partial(activation_bytes, self),
            checkpoint=self.checkpoint,
            offload=self.offload,
        )

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """Accumulators are held in the score dtype when it is narrower than fp32 (lean mode)."""
        return self.score_dtype if self.score_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _weighted_loss(model: Any, batch: torch.Tensor, weight: float, checkpoint: bool) -> torch.Tensor:
    return lm_loss(model, batch, checkpoint=checkpoint) * weight


def activation_bytes(ctx: ScoreContext, checkpoint: bool) -> int:
    """Estimated activation peak of one batch of ``ctx``'s first-order pass on CUDA, in bytes:
    a = what one window's forward keeps for the backward pass, measured once per (model, window
    length, dtype, attention kernel) and cached on the model, both without (a_full) and with (a_ckpt)
    checkpointing; the estimate is ACT_MARGIN·B·a_full, or ACT_MARGIN·B·(a_ckpt + 2·a_full/layers)
    with checkpointing (one decoder layer recomputed and differentiated at a time), plus two
    gradients of the largest scored tensor in flight."""
    model = ctx.model
    weight = model.get_input_embeddings().weight
    key = (ctx.windows.shape[1], weight.dtype, getattr(model.config, "_attn_implementation", None))
    cache = model.__dict__.setdefault("_esa_activation_probe", {})
    if key not in cache:
        window = ctx.windows[:1].to(weight.device)
        cache[key] = (_kept_bytes(model, window, False), _kept_bytes(model, window, True))
    full, ckpt = cache[key]
    layers = max(1, len(decoder_layers(model)))
    per_batch = full if not checkpoint else ckpt + 2 * full / layers
    largest = max(p.numel() * p.element_size() for p in ctx.params)
    return int(ACT_MARGIN * ctx.batch_size * per_batch + 2 * largest)


def _kept_bytes(model, window: torch.Tensor, checkpoint: bool) -> int:
    """Device bytes a forward of ``window`` keeps alive for its backward pass."""
    device = window.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    with checkpointed(model, checkpoint):
        loss = lm_loss(model, window, checkpoint=checkpoint)
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before
    del loss
    return max(0, int(kept))


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
    offload: bool | None = None,
    memory_limit: int | None = None,
    hutchinson_method: str | None = None,
    report: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Score the ``names`` parameters of ``lm`` (default ``lm.param_map.scorable()``) by ``metric``
    on calibration windows ``calib`` ``[n, L]``; returns name -> score (param shape and device).

    Scores are built in place in ``score_dtype``: fp32 (default) costs 4 bytes per scored weight;
    bf16 halves that and also accumulates the gradient metrics in bf16 (lean mode, for models
    whose fp32 scores do not fit beside the weights). ``checkpoint`` switches activation
    checkpointing of first-order gradient passes on/off (None: on when memory asks for it);
    ``offload`` keeps the gradient and curvature accumulators (for magnitude and act_mag, the
    scores themselves: ``host_scores``) in host memory (True), on the device (False) or decides
    per tensor (None); ``memory_limit`` is the peak in bytes the pass should
    stay under (CUDA: device memory; CPU: the resident set; None: what is free).
    ``hutchinson_method`` ("tangent", "lean", "retained") overrides the planned one
    (``esa.metrics.curvature.hutchinson_diag``). Scores of offloaded tensors come back on the CPU,
    all others on their parameter's device. ``report``, a dict, receives the memory plan.
    """
    spec = _spec(metric)
    ctx = score_context(
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
        offload=offload,
        memory_limit=memory_limit,
        hutchinson_method=hutchinson_method,
    )
    raw = run_metric(ctx, spec.fn, spec.needs_grad)
    plan = ctx.options.get("plan")
    if report is not None and plan is not None:
        report["memory_plan"] = plan.to_dict()
    on_host = {ctx.names[i] for i in plan.offload} if plan is not None else set()
    out = {}
    for n, p in ctx.items():
        device = "cpu" if n in on_host else p.device
        out[n] = raw.pop(n).detach().to(device=device, dtype=score_dtype)
    return out


def _spec(metric: str) -> MetricSpec:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return METRICS[metric]


def score_context(lm, spec: MetricSpec, calib, names, **options) -> ScoreContext:
    """The validated ScoreContext of ``spec`` for the ``names`` parameters of ``lm``."""
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


def run_metric(ctx: ScoreContext, fn: Callable[[ScoreContext], dict], needs_grad: bool) -> dict:
    """``fn(ctx)`` with only the scored parameters requiring grad (none unless ``needs_grad``)."""
    with grad_scope(ctx.model, ctx.params if needs_grad else []):
        return fn(ctx)


@contextlib.contextmanager
def grad_scope(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
    """Only ``params`` require grad, model in eval mode; restore flags and free ``.grad`` on exit."""
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        model.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        model.train(training)


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
