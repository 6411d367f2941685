"""Forward-over-reverse Hutchinson: H z as the tangent of the gradient (``esa.metrics.curvature``).

Every scored weight w becomes the dual number w + ε z (forward-mode AD,
``torch.autograd.forward_ad``), z a Rademacher probe (``esa.metrics.probes.probe``). One forward
pass and one ordinary backward pass then give the dual gradient ∇L(w + ε z) = ∇L + ε H z + O(ε²):
its tangent is the Hessian-vector product, and it arrives parameter by parameter, where a tensor
hook adds z_i ⊙ (H z)_i into the fp32 accumulators and the gradient is freed. No double-backward
graph is built: memory is the weights, the accumulators, one window's first-order graph with its
tangents (about twice its activations) and the probe, which the backward pass needs as the
weights' tangents.

Probe blocks: with the parameters split into K contiguous blocks, pass b carries the tangents
z_b of block b only (zero elsewhere). H z = Σ_b H z_b, so adding z ⊙ H z_b over the K passes gives
the same estimate as one pass (up to float rounding) while holding 1/K of the probe, for K
passes of compute. ``probe_blocks`` picks K from a bound on the probe bytes held.

Ops whose backward has no forward-AD formula are rewritten for the pass (``_DECOMPOSED``: silu as
x·σ(x)); a model that still hits one raises ``TangentUnsupported`` and the caller falls back to
the double-backward estimator (``esa.metrics.probes.hutchinson_lean``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from esa.metrics.accumulate import Accumulators
from esa.metrics.probes import probe
from esa.util.memory import trim_heap


class TangentUnsupported(RuntimeError):
    """The model uses an op whose backward has no forward-AD formula."""


def _silu(x, inplace: bool = False):
    return x * torch.sigmoid(x)


_DECOMPOSED = {F.silu: _silu}  # op -> the same function in ops whose backward has forward AD


class _Decompose(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _DECOMPOSED.get(func, func)(*args, **(kwargs or {}))


def probe_blocks(sizes: Sequence[int], max_numel: int | None) -> list[range]:
    """Contiguous blocks of parameter positions, each holding at most ``max_numel`` entries
    (a larger parameter is a block of its own); ``None``: one block of all.

    >>> probe_blocks([4, 4, 4, 9, 1], 8)
    [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    """
    if max_numel is None:
        return [range(len(sizes))]
    blocks, start, held = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and held + n > max_numel:
            blocks.append(range(start, i))
            start, held = i, 0
        held += n
    blocks.append(range(start, len(sizes)))
    return blocks


@contextlib.contextmanager
def _leaves(model: torch.nn.Module, params: Sequence[torch.Tensor], make) -> Iterator[dict]:
    """For the block, every module attribute holding ``params[i]`` holds the new leaf
    ``make(i, params[i])`` instead (one leaf per parameter, tied attributes share it); yields
    {i: leaf}. The parameters themselves are untouched (the leaves share their storage)."""
    index = {id(p): i for i, p in enumerate(params)}
    slots = [
        (mod, name, p)
        for mod in model.modules()
        for name, p in mod._parameters.items()
        if p is not None and id(p) in index
    ]
    made: dict[int, torch.Tensor] = {}
    for mod, name, p in slots:
        i = index[id(p)]
        if i not in made:
            made[i] = make(i, p)
        mod._parameters[name] = made[i]  # type: ignore[assignment]
    try:
        yield made
    finally:
        for mod, name, p in slots:
            mod._parameters[name] = p


def hutchinson_tangent(
    loss_terms,
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    samples: int,
    seed: int,
    max_probe_numel: int | None = None,
    offload=(),
) -> list[torch.Tensor]:
    """Signed Hutchinson estimate of diag(H) by forward-over-reverse (module docstring): the
    mean over ``samples`` probes of z ⊙ H z, the same probes (``probe(seed, s, i)``) as
    ``hutchinson_lean``. ``params`` must be parameters of ``model``, reached by the loss terms
    through its modules. Raises ``TangentUnsupported`` (its partial sums discarded) when the
    model's backward has an op without forward AD."""
    params = list(params)
    blocks = probe_blocks([p.numel() for p in params], max_probe_numel)
    with Accumulators(params, torch.float32, offload) as acc:
        for term in loss_terms:
            for s in range(samples):
                for block in blocks:
                    try:
                        _tangent_pass(term, model, params, acc, seed, s, block)
                    except RuntimeError as exc:
                        if "forward AD" in str(exc):
                            raise TangentUnsupported(str(exc).splitlines()[0]) from exc
                        raise
        return acc.finish(lambda a, _i: a.div_(samples))


def _tangent_pass(term, model, params, acc: Accumulators, seed: int, sample: int, block: range) -> None:
    """One forward and backward pass with the tangents z of ``block``: adds z ⊙ (H z_block)
    into every accumulator."""
    carried = set(block)

    def make(i: int, p: torch.Tensor) -> torch.Tensor:
        w = p.detach()
        if i in carried:
            w = fwAD.make_dual(w, probe(p.shape, p.dtype, p.device, seed, sample, i))
        leaf = w.requires_grad_()
        leaf.register_hook(lambda g, i=i: _add(acc, i, g, seed, sample))
        leaf.register_post_accumulate_grad_hook(_drop_grad)
        return leaf

    with fwAD.dual_level(), _Decompose():
        with _leaves(model, params, make) as leaves:
            loss = term()
        if loss.requires_grad:
            loss.backward(inputs=list(leaves.values()))
    del loss, leaves
    trim_heap()  # the pass's probe block and graph (CPU: mostly heap chunks glibc would keep)


def _add(acc: Accumulators, i: int, grad: torch.Tensor, seed: int, sample: int) -> None:
    hz = fwAD.unpack_dual(grad).tangent
    if hz is not None:  # None: no tangent reached this weight (H z_block is zero there)
        acc.add(i, probe(hz.shape, hz.dtype, hz.device, seed, sample, i).mul_(hz))


def _drop_grad(leaf: torch.Tensor) -> None:
    leaf.grad = None
