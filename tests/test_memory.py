"""esa.util.memory: freed heap memory goes back to the OS (the claims session's resident set)."""

import gc
from pathlib import Path

import pytest
import torch

from esa.util import memory


def rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_trim_heap_returns_freed_tensors_to_the_os():
    """Tensors freed between live small ones leave holes that glibc keeps resident (score tensors
    of one weight matrix sit below its mmap threshold); trim_heap releases them."""
    torch.empty(8 << 20, dtype=torch.uint8)  # freed at once: glibc's mmap threshold rises above 2 MB
    big, small = [], []
    for _ in range(200):  # 400 MiB on the heap, each block followed by a live 1 KiB one
        big.append(torch.ones(2 << 20, dtype=torch.uint8))
        small.append(torch.ones(1024, dtype=torch.uint8))
    del big
    gc.collect()
    before = rss_mib()
    assert memory.trim_heap()
    assert before - rss_mib() > 200 and len(small) == 200
