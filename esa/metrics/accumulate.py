"""Running per-parameter sums for the scoring passes, on the device or offloaded to host memory,
and the memory plan that chooses between them.

``Accumulators`` hold S_i = Σ_t x_{i,t} (or Σ_t x_{i,t}², ``square=True``) for each parameter i
in ``dtype`` (fp32 by default). Accumulator i lives either on its parameter's device or, when i
is in ``offload``, in pinned host memory. An offloaded add runs on the GPU all the same, on a side
CUDA stream: S_i is copied into a device work buffer, x is added there by the very kernel the
on-device path uses, and the sum is copied back (8 bytes per entry over PCIe, 4 for the first
add, overlapping the compute of the next gradients; the final transform of the scores, e.g.
|S ⊙ w|, goes the same way; at most ``_IN_FLIGHT`` adds wait per stream, which bounds the
gradients kept alive for them). Accumulator i always uses stream i mod ``_STREAMS``, so its adds
land in order. Hence an offloaded sum is bit-identical to the on-device one: same operation, same
operands, same order. On the CPU the "host" is the device and the add is direct.

``plan_memory`` decides, on CUDA, whether a first-order pass checkpoints activations and which
accumulators go to the host, from the device memory left under ``limit`` (default: what the
device has free plus what this process holds), the accumulator bytes and a measured activation
footprint: no checkpointing and nothing offloaded when all fits (the fastest), else checkpointing,
else checkpointing and offloading accumulators spread over the model (``offload_order``) until
the rest fits.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger("esa")

_STREAMS = 2  # side streams per device for offloaded adds (copies in both directions overlap)
_IN_FLIGHT = 4  # offloaded adds queued per stream before the caller waits for the oldest
SLACK_BYTES = 1 << 30  # kept free under the limit (allocator fragmentation, cuBLAS workspaces)
ACT_MARGIN = 1.25  # activation estimates are scaled by this before they are compared


class Accumulators:
    """Per-parameter running sums S_i in ``dtype``; ``offload`` = indices held in host memory.

    ``add(i, x)`` adds x (any float dtype, param i's shape, on its device) into S_i;
    ``add(i, x, square=True)`` adds x² computed in fp32 (``addcmul_``) into an fp32 S_i, or
    ``x.float().square()`` into a narrower one. ``finish(fn)`` applies ``fn(S_i, i)`` in place to
    every sum, on the device for offloaded ones too, and returns ``result()``: the S_i once every
    offloaded operation has landed (host tensors for offloaded i). Usable as a context manager."""

    def __init__(self, params: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32, offload=()):
        self.offload = frozenset(int(i) for i in offload)
        self.sums: list[torch.Tensor] = []
        self._devices: dict[int, torch.device] = {}  # offloaded sums of CUDA parameters
        for i, p in enumerate(params):
            if i in self.offload and p.is_cuda:  # written before it is read: no zero fill
                self.sums.append(torch.empty(p.shape, dtype=dtype, pin_memory=True))
                self._devices[i] = p.device
            elif i in self.offload:
                self.sums.append(torch.zeros(p.shape, dtype=dtype))
            else:
                self.sums.append(torch.zeros(p.shape, dtype=dtype, device=p.device))
        self._largest = max((params[i].numel() for i in self._devices), default=0)
        self._lanes: dict[tuple[torch.device, int], _Lane] = {}
        self._added: set[int] = set()  # offloaded CUDA sums that hold a value (others: unset)

    def _lane(self, i: int) -> _Lane:
        key = (self._devices[i], i % _STREAMS)
        if key not in self._lanes:
            self._lanes[key] = _Lane(key[0], self._largest, self.sums[i].dtype)
        return self._lanes[key]

    def add(self, i: int, x: torch.Tensor, square: bool = False) -> None:
        if i not in self._devices:
            _add_into(self.sums[i], x, square)
            return
        self._lane(i).run(self.sums[i], lambda w: _add_into(w, x, square), i not in self._added, keep=x)
        self._added.add(i)

    def finish(self, fn: Callable[[torch.Tensor, int], object]) -> list[torch.Tensor]:
        """``fn(S_i, i)`` in place on every sum (through the GPU for offloaded ones), then ``result()``."""
        for i, s in enumerate(self.sums):
            if i in self._devices:
                self._lane(i).run(s, lambda w, i=i: fn(w, i), i not in self._added)
                self._added.add(i)
            else:
                fn(s, i)
        return self.result()

    def result(self) -> list[torch.Tensor]:
        """The sums, once every offloaded operation has landed in host memory."""
        for lane in self._lanes.values():
            lane.stream.synchronize()
        for i in self._devices.keys() - self._added:  # never added to: zero
            self.sums[i].zero_()
            self._added.add(i)
        return self.sums

    def close(self) -> None:
        self.result()
        self._lanes.clear()

    def __enter__(self) -> Accumulators:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lane:
    """One side stream with its device work buffer: H2D of S, fn(S), D2H of S, in stream order."""

    def __init__(self, device: torch.device, numel: int, dtype: torch.dtype):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.work = torch.empty(numel, dtype=dtype, device=device)
        self.pending: deque[torch.cuda.Event] = deque()

    def run(self, host: torch.Tensor, fn: Callable, fresh: bool, keep: torch.Tensor | None = None) -> None:
        """``host`` ← fn(host) on the device (``fresh``: host holds nothing yet, start from zeros);
        ``keep`` (read by fn) is not freed before the stream has used it."""
        while len(self.pending) >= _IN_FLIGHT:
            self.pending.popleft().synchronize()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            work = self.work[: host.numel()].view(host.shape)
            if fresh:
                work.zero_()
            else:
                work.copy_(host, non_blocking=True)
            fn(work)
            host.copy_(work, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        if keep is not None:
            keep.record_stream(self.stream)
        self.pending.append(done)


def _add_into(acc: torch.Tensor, x: torch.Tensor, square: bool) -> None:
    if not square:
        acc.add_(x)
    elif acc.dtype == torch.float32:
        x32 = x.float()
        acc.addcmul_(x32, x32)
    else:
        acc.add_(x.float().square())


# --- the memory plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """How a scoring pass runs: activation checkpointing on/off and the offloaded accumulators."""

    checkpoint: bool
    offload: frozenset[int] = frozenset()
    reason: str = ""

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "offloaded": len(self.offload), "reason": self.reason}


def available_bytes(device: torch.device, limit: int | None = None) -> int:
    """Device bytes this process may still allocate: ``limit`` (a peak for the whole process)
    minus what it holds now, or by default what the device has free plus what this process's
    allocator caches without using."""
    allocated = torch.cuda.memory_allocated(device)
    if limit is not None:
        return int(limit) - allocated
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - allocated)


def plan_memory(
    acc_bytes: Sequence[int],
    available: int,
    activations: Callable[[bool], int],
    checkpoint: bool | None = None,
    offload: bool | None = None,
) -> MemoryPlan:
    """The plan of a first-order pass with accumulators of ``acc_bytes`` (parameter order) and
    ``available`` device bytes; ``activations(checkpointed) -> bytes`` estimates the pass's
    activation peak (called only when needed). ``checkpoint`` / ``offload`` force a choice
    (``offload=True``: every accumulator on the host).

    Order of preference: everything on the device without checkpointing; with checkpointing;
    with checkpointing and accumulators spread over the model (so their transfers overlap the
    whole backward pass) offloaded until the device ones fit."""
    room = available - SLACK_BYTES
    total = sum(acc_bytes)
    every = frozenset(range(len(acc_bytes)))
    if offload is True:
        ckpt = True if checkpoint is None else checkpoint
        return MemoryPlan(ckpt, every, "offload forced")
    if checkpoint is not True and total + activations(False) <= room:
        return MemoryPlan(False, frozenset(), "fits without checkpointing")
    if checkpoint is False:
        return MemoryPlan(False, frozenset(), "checkpointing off (forced)")
    need = activations(True)
    if total + need <= room or offload is False:
        return MemoryPlan(True, frozenset(), "fits with checkpointing")
    moved = offload_until(acc_bytes, room - need)
    kept = total - sum(acc_bytes[i] for i in moved)
    if kept + need > room:
        log.warning(
            "esa: scoring needs ~%.1f GiB of activations, %.1f GiB are available; it may run out "
            "of memory (use smaller batches)",
            need / 2**30,
            max(0, room) / 2**30,
        )
    return MemoryPlan(True, moved, f"{len(moved)} accumulators offloaded to host memory")


def offload_until(acc_bytes: Sequence[int], room: int) -> frozenset[int]:
    """The accumulator positions to offload until the others fit in ``room`` bytes beside the
    offload work buffers (``_STREAMS`` of the largest offloaded accumulator), taken in
    ``offload_order`` (spread over the model, so the transfers spread over the backward pass)."""
    moved: list[int] = []
    kept = sum(acc_bytes)
    for i in offload_order(len(acc_bytes)):
        work = _STREAMS * max((acc_bytes[j] for j in moved), default=0)
        if kept + work <= room:
            break
        moved.append(i)
        kept -= acc_bytes[i]
    return frozenset(moved)


def host_scores(
    params: Sequence[torch.Tensor], dtype: torch.dtype, offload: bool | None, limit: int | None = None
) -> frozenset[int]:
    """Positions whose scores (one ``dtype`` tensor per parameter, built one at a time from an fp32
    transient) go to host memory: all (``offload`` True), none (False, or on the CPU), else, per
    CUDA device, those ``offload_until`` picks so the rest fit in ``available_bytes`` minus
    ``SLACK_BYTES`` and two fp32 copies of that device's largest parameter."""
    if offload is not None:
        return frozenset(range(len(params))) if offload else frozenset()
    moved: set[int] = set()
    for device in {p.device for p in params if p.is_cuda}:
        at = [i for i, p in enumerate(params) if p.device == device]
        sizes = [params[i].numel() * dtype.itemsize for i in at]
        room = available_bytes(device, limit) - SLACK_BYTES - 8 * max(params[i].numel() for i in at)
        moved |= {at[j] for j in offload_until(sizes, room)}
    if moved:
        log.warning(
            "esa: %d of %d score tensors kept in host memory (they do not fit on the device)",
            len(moved),
            len(params),
        )
    return frozenset(moved)


def offload_order(n: int) -> list[int]:
    """Positions n-1 … 0 interleaved with stride s = ⌈√n⌉: n-1, n-1-s, n-1-2s, …, n-2, n-2-s, …
    (a prefix of it is spread evenly over the model; every position appears once)."""
    stride = max(1, math.isqrt(max(0, n - 1)) + 1)
    return [i for r in range(stride) for i in range(n - 1 - r, -1, -stride)]
