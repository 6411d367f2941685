"""Peak memory of a stretch of code in this process, without importing torch: the resident set's
high-water mark (Linux VmHWM, reset through ``/proc/self/clear_refs``) and, when torch has already
initialised CUDA, the peak allocated GPU memory; `trim_heap` gives freed heap memory back.

>>> scope = reset_peak()
>>> sorted(peak(scope))
['gpu_gib', 'rss_gib', 'rss_scope']
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
from pathlib import Path

GIB = 1024**3
_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _cuda():
    torch = sys.modules.get("torch")  # never imported here: only measured where a claim used it
    return torch if torch is not None and torch.cuda.is_initialized() else None


def _field(path: Path, name: str) -> int | None:
    """The ``name:`` line of a /proc file in bytes (its kB value), or None off Linux."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _vm_hwm() -> int | None:
    """VmHWM (peak resident set) of this process in bytes, or None off Linux."""
    return _field(_STATUS, "VmHWM")


def ram_room(limit: int | None = None) -> int | None:
    """Bytes of RAM this process may still take: ``limit`` (a peak resident set for the whole
    process) minus its resident set now, or by default what the system has available
    (MemAvailable); None where /proc does not say."""
    if limit is None:
        return _field(Path("/proc/meminfo"), "MemAvailable")
    rss = _field(_STATUS, "VmRSS")
    return None if rss is None else int(limit) - rss


def reset_peak() -> str:
    """Start a measurement; returns its RSS scope: "since reset" where Linux lets the resident
    set's high-water mark be reset (``echo 5 > /proc/self/clear_refs``), else "process" (the peak
    since the process started, ``ru_maxrss``). Resets the GPU peak too when CUDA is in use."""
    cuda = _cuda()
    if cuda is not None:
        for i in range(cuda.cuda.device_count()):
            cuda.cuda.reset_peak_memory_stats(i)
    try:
        _CLEAR.write_text("5")
        return "since reset" if _vm_hwm() is not None else "process"
    except OSError:
        return "process"


def peak(scope: str) -> dict:
    """``{"rss_gib", "rss_scope", "gpu_gib"}`` since `reset_peak` (plain floats; gpu_gib None
    without CUDA in use)."""
    hwm = _vm_hwm() if scope == "since reset" else None
    rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = _cuda()
    gpu = sum(cuda.cuda.max_memory_allocated(i) for i in range(cuda.cuda.device_count())) if cuda else None
    return {
        "rss_gib": round(rss / GIB, 3),
        "rss_scope": scope if hwm is not None else "process",
        "gpu_gib": None if gpu is None else round(gpu / GIB, 3),
    }


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> bool:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim(0)``; False elsewhere or
    when nothing was released). Freed CPU tensors below glibc's mmap threshold (~32 MB: a score
    tensor of one weight matrix) stay in the resident set otherwise: a claims session on a 135M
    model kept ~1 GiB of freed score sets resident."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
