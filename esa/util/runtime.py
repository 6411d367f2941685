"""The machine a run happens on: environment and git commit, seeded RNG, GPU placement and
accelerator memory (peaks summed over GPUs; resident set size on CPU)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from esa.util.memory import trim_heap

GIB = 1024**3


def git_commit(root: str | os.PathLike = ".") -> str | None:
    """HEAD of the git checkout at `root`, or None outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_environment(root: str | os.PathLike = ".") -> dict:
    """Versions (python, torch, transformers, esa, pytest), platform, host, git commit, CPU/GPU."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "esa": version("esa"),
        "pytest": version("pytest"),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "executable": sys.executable,
        "git_commit": git_commit(root),
        "rootdir": str(root),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def package_root() -> Path:
    """The directory holding the esa package (its git checkout in a development install)."""
    return Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the outer RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def worker_gpu() -> int:
    """The GPU index for this process: ``gwN`` (pytest-xdist worker N) -> N mod #GPUs, else the
    current device."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = torch.cuda.device_count()
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        return int(worker[2:]) % count
    return torch.cuda.current_device() if count else 0


def sync() -> None:
    """Wait for every GPU (no-op without CUDA)."""
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def free_memory() -> None:
    """Collect garbage, return cached GPU blocks to the driver and free heap memory to the OS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def reset_peak() -> int:
    """Reset peak stats on every GPU; return the bytes allocated now (all GPUs; 0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    sync()
    now = 0
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)
        now += torch.cuda.memory_allocated(i)
    return now


def peak_gpu_bytes() -> int:
    """Peak GPU memory since the last reset, summed over GPUs (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    sync()
    return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


def peaks_per_gpu() -> list[float]:
    """Peak GiB per GPU since the last reset."""
    if not torch.cuda.is_available():
        return []
    return [round(torch.cuda.max_memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())]


def peak_memory(device: torch.device) -> int:
    """Peak bytes on `device`: allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
