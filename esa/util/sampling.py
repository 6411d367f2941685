"""Seeded sampling helpers: per-tensor seeds, k distinct uniform positions (optionally among
accepted ones only), and a pseudo-random tie-break priority of flat indices.

Everything is a pure function of its arguments (seed, tensor name, positions): the same inputs
draw the same entries on every machine.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable

import torch

_P = 2**31 - 1  # Mersenne prime: affine steps mod P stay below 2**63 in int64


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed for ``name`` under run seed ``seed`` (crc32 of the name mixed in)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def sample_unique(total: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers uniform in [0, total): first k distinct of iid draws (or randperm)."""
    if 2 * k >= total:
        return torch.randperm(total, generator=gen)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(0, total, (k - chosen.numel(),), generator=gen)
        fresh = torch.unique(draw)
        chosen = torch.cat([chosen, fresh[~torch.isin(fresh, chosen)]])
    return chosen


def sample_accepted(
    total: int,
    k: int,
    gen: torch.Generator,
    count: int,
    accept: Callable[[torch.Tensor], torch.Tensor],
    enumerate_all: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """k distinct positions uniform among the ``count`` accepted positions of [0, total).

    ``accept(pos)`` says which positions are accepted (bool, CPU); ``enumerate_all()`` lists
    them all (ascending, CPU). With every position accepted it draws exactly what
    :func:`sample_unique` draws; when accepted positions are few (``4·count < total``) or k is
    close to them (``2k ≥ count``) it enumerates and permutes, else it rejects iid draws (each
    round keeps a uniformly chosen subset of the fresh accepted ones, so the set stays uniform).
    """
    if count == total:
        return sample_unique(total, k, gen)
    if 2 * k >= count or 4 * count < total:
        return enumerate_all()[torch.randperm(count, generator=gen)[:k]]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, total, (math.ceil(need * total / count) + 8,), generator=gen)
        fresh = torch.unique(draw[accept(draw)])
        fresh = fresh[~torch.isin(fresh, chosen)]
        if fresh.numel() > need:
            fresh = fresh[torch.randperm(fresh.numel(), generator=gen)[:need]]
        chosen = torch.cat([chosen, fresh])
    return chosen


def priority(index: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Pseudo-random priorities in [0, 2**31) of flat indices of tensor ``name`` under ``seed``.

    x ← index mod P, then three rounds of x ← ((a·x + b) mod P) xor (x ≫ 16) with (a, b) drawn
    from ``tensor_seed(seed, name)``; P = 2**31 − 1. Used to break ties in a score order: the
    same (seed, name, index) always gets the same priority, different seeds reorder ties.
    """
    rng = random.Random(tensor_seed(seed, name))
    x = index.to(torch.int64) % _P
    for _ in range(3):
        x = (x * rng.randrange(1, _P) + rng.randrange(_P)) % _P
        x = x ^ (x >> 16)
    return x


def sample_segments(
    sizes: list[int], k: int, gen: torch.Generator, masks: list[torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct entries uniform over consecutive segments of ``sizes`` entries, as (segment,
    offset within it); ``masks[i]`` (flat bool, CPU) restricts segment i to its True entries.

    Without masks this is :func:`sample_unique` over the concatenation (the same draws).
    """
    masks = masks or [None] * len(sizes)
    numels = torch.tensor(sizes, dtype=torch.long)
    ends = torch.cumsum(numels, 0)
    starts = ends - numels
    count = sum(int(m.sum()) if m is not None else n for m, n in zip(masks, sizes))

    def accept(draw: torch.Tensor) -> torch.Tensor:
        which = torch.searchsorted(ends, draw, right=True)
        ok = torch.ones_like(draw, dtype=torch.bool)
        for i, mask in enumerate(masks):
            if mask is not None:
                here = which == i
                ok[here] = mask[draw[here] - starts[i]]
        return ok

    def enumerate_all() -> torch.Tensor:
        return torch.cat(
            [
                (torch.arange(n) if m is None else m.nonzero().flatten()) + starts[i]
                for i, (m, n) in enumerate(zip(masks, sizes))
            ]
        )

    pos = sample_accepted(int(ends[-1]), k, gen, count, accept, enumerate_all)
    which = torch.searchsorted(ends, pos, right=True)
    return which, pos - starts[which]
