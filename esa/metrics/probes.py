"""Rademacher probes and the lean Hutchinson estimator of diag(H) (``esa.metrics.curvature``).

Lean Hutchinson (on CUDA, or ``method="lean"``): the gradient g = ∇L_b of a term is built with
``backward(create_graph=True)`` one parameter at a time, and a post-accumulate hook turns each g_i
into the scalars g_i·z_{s,i} of every probe s and frees it (``ProbeDot``: z is regenerated from its
seed in the backward pass instead of being saved); then for each probe ∇_w Σ_i g_i·z_{s,i} = H z_s
arrives parameter by parameter and the hook adds z_{s,i} ⊙ (H z_s)_i into fp32 accumulators (on the
device, or in host memory: ``esa.metrics.accumulate``). Neither g, z nor Hz of the whole model is
ever held: memory is the weights, the accumulators and the double-backward graph of one batch, whose
size ``curvature_plan`` bounds by the windows per batch. Same probes, same estimate as the
retained-gradient path (which batches probes through vmap for small models) and as
forward-over-reverse (``esa.metrics.tangent``), the CPU's method, whose probe blocks
``curvature_plan`` sizes to a memory limit.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

from esa.evaluate import lm_loss
from esa.metrics.accumulate import SLACK_BYTES, Accumulators, available_bytes, offload_until
from esa.metrics.gradient import param_hooks
from esa.metrics.registry import LossTerms, ScoreContext, activation_bytes
from esa.util.memory import ram_room, trim_heap

log = logging.getLogger("esa")

_DOUBLE_BACKWARD = 7  # a batch's double-backward peak / its first-order activations (6.5 measured at 8B)
_TANGENT = 6  # a forward-over-reverse pass beyond its probe / first-order activations (5.8 at 0.5B)
_RAM_SLACK = 256 << 20  # kept free under a CPU limit (allocator fragmentation)


def probe(shape, dtype, device, seed: int, sample: int, index: int) -> torch.Tensor:
    """Tensor ``index`` of probe ``sample``: ±1 from a generator seeded by (seed, sample, index)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + sample) * 10_007 + index)
    z = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
    return (z * 2 - 1).to(dtype)


class ProbeDot(torch.autograd.Function):
    """A scalar whose gradient with respect to g is the probe z (of seed, sample, index): the
    backward half of g·z. Its value is 0 (only its gradient is used), and z is regenerated in the
    backward pass rather than saved."""

    @staticmethod
    def forward(ctx, g, seed, sample, index):
        ctx.probe = (g.shape, g.dtype, g.device, seed, sample, index)
        return g.new_zeros(())

    @staticmethod
    def backward(ctx, out):
        return probe(*ctx.probe).mul_(out), None, None, None


def hutchinson_lean(loss_terms: LossTerms, params: list, samples: int, seed: int, offload=()) -> list:
    """The lean estimator (module docstring): per term one ``backward(create_graph=True)`` whose
    hooks turn each g_i into the probes' g_i·z_{s,i}, then per probe one backward of their sum whose
    hooks add z_{s,i} ⊙ (H z_s)_i into the accumulators."""
    slots: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        slots.setdefault(id(p), []).append(i)
    unique = list({id(p): p for p in params if p.requires_grad}.values())
    state: dict = {"dots": [], "sample": None}
    with Accumulators(params, torch.float32, offload) as acc:

        def hook(param):
            g = param.grad
            param.grad = None
            if g is None:
                return
            s = state["sample"]
            for i in slots[id(param)]:
                if s is None:  # first backward: g carries its graph
                    if g.requires_grad:
                        for k, dots in enumerate(state["dots"]):
                            dots.append(ProbeDot.apply(g, seed, k, i))
                else:
                    acc.add(i, probe(g.shape, g.dtype, g.device, seed, s, i).mul_(g))

        handles = param_hooks(params, hook)
        try:
            for term in loss_terms:
                loss = term()
                if not loss.requires_grad or not unique:
                    continue
                state.update(dots=[[] for _ in range(samples)], sample=None)
                with warnings.catch_warnings():  # the hook clears .grad: no parameter-gradient cycle
                    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
                    loss.backward(create_graph=True, inputs=unique)
                del loss
                dots, state["dots"] = state["dots"], []
                for s in range(samples):
                    if dots[s]:
                        state["sample"] = s
                        total = sum(d.to(dots[s][0].device) for d in dots[s])
                        total.backward(inputs=unique, retain_graph=s < samples - 1)
                    dots[s] = []
                del dots
        finally:
            for h in handles:
                h.remove()
            for p in params:
                p.grad = None
        return acc.finish(lambda s, _i: s.div_(samples))


@dataclasses.dataclass(frozen=True)
class CurvaturePlan:
    """How a double-backward pass runs: windows per loss term, offloaded accumulator positions."""

    batch_size: int
    offload: frozenset[int] = frozenset()
    method: str = "lean"  # how Hutchinson computes H z (``esa.metrics.curvature.hutchinson_diag``)
    probe_numel: int | None = None  # probe entries carried per tangent pass (None: all)

    def to_dict(self) -> dict:
        return {
            "checkpoint": False,
            "offloaded": len(self.offload),
            "batch_size": self.batch_size,
            "method": self.method,
            "probe_numel": self.probe_numel,
        }


def curvature_plan(ctx: ScoreContext, accumulators: bool = True) -> CurvaturePlan:
    """The plan of a double-backward pass over ``ctx`` (kept in ``ctx.options["plan"]``).

    On one CUDA device: the fp32 accumulators (``accumulators``: one per scored weight) stay on it
    as long as they and one window's double-backward peak (``_DOUBLE_BACKWARD`` x its measured
    first-order activations) fit in the memory available (``ScoreContext.memory_limit``); else
    some, spread over the model, go to host memory until the rest fit (``offload`` True / False:
    all / none); then as many windows per term as fit, at most ``batch_size``; Hutchinson by
    double backward. On the CPU: one window per term (the same compute; a 512-token
    double-backward term of a 135M model keeps ~2.5 GB of graph), offload only when forced,
    Hutchinson by forward-over-reverse with the probe blocks of ``_probe_numel``; on several
    devices: ``batch_size``, double backward. ``ScoreContext.hutchinson_method`` overrides the
    method. The estimate depends on none of these choices (the terms sum to the same loss, the
    probe blocks to the same product)."""
    every = frozenset(range(len(ctx.params))) if accumulators else frozenset()
    devices = {p.device for p in ctx.params}
    device = next(iter(devices))
    if len(devices) > 1 or device.type != "cuda":  # on the CPU one window per term: its graph
        batch = 1 if device.type == "cpu" else ctx.batch_size  # is several times its activations
        method = ctx.hutchinson_method or ("tangent" if device.type == "cpu" else "lean")
        numel = _probe_numel(ctx, batch) if method == "tangent" and accumulators else None
        plan = CurvaturePlan(batch, every if ctx.offload else frozenset(), method, numel)
    else:
        room = available_bytes(device, ctx.memory_limit) - SLACK_BYTES
        per_window = _DOUBLE_BACKWARD * activation_bytes(dataclasses.replace(ctx, batch_size=1), False)
        acc = [4 * p.numel() if accumulators else 0 for p in ctx.params]
        moved: frozenset[int] = frozenset()
        if accumulators and ctx.offload is not False:
            moved = every if ctx.offload else offload_until(acc, room - per_window)
        kept = sum(acc) - sum(acc[i] for i in moved)
        batch = max(1, min(ctx.batch_size, (room - kept) // max(1, per_window)))
        plan = CurvaturePlan(int(batch), moved, ctx.hutchinson_method or "lean")
    ctx.options["plan"] = plan
    return plan


def _probe_numel(ctx: ScoreContext, batch: int) -> int | None:
    """Probe entries a CPU tangent pass may carry (None: the whole probe in one pass): the room
    left under ``ctx.memory_limit`` (a peak resident set; default: the RAM available) after the
    fp32 accumulators, ``_TANGENT`` x the batch's first-order activations (``saved_bytes``; the
    pass keeps them with their tangents, and the tangent computations record their own graph),
    the per-tensor transients of the hooks (probe, dual gradient: ~4 fp32 copies of the largest
    tensor) and ``_RAM_SLACK``. At least the largest tensor, with a warning when even that
    exceeds the room."""
    room = ram_room(ctx.memory_limit)
    if room is None:
        return None
    entries = [p.numel() for p in ctx.params]
    size = max(p.element_size() for p in ctx.params)
    need = 4 * sum(entries) + 16 * max(entries) + _RAM_SLACK
    need += _TANGENT * saved_bytes(ctx.model, ctx.windows[:batch].to(ctx.params[0].device))
    fits = (room - need) // size
    if fits >= sum(entries):
        return None
    if fits < max(entries):
        log.warning(
            "esa: hutchinson_diag needs ~%.1f GiB more than the %.1f GiB left; carrying one tensor's probe per pass",
            (need + size * max(entries) - room) / 2**30,
            max(0, room) / 2**30,
        )
    return int(max(fits, max(entries)))


def saved_bytes(model: torch.nn.Module, window: torch.Tensor) -> int:
    """Bytes a first-order forward of ``window`` saves for its backward pass, parameters excluded
    (storages counted once; measured through saved-tensor hooks, so on any device)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # a tensor without a plain storage (a subclass): not counted
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, window)
    del loss
    trim_heap()
    return sum(seen.values())
