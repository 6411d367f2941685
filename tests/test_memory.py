"""esa.util.memory: freed heap memory goes back to the OS (the claims session's resident set)."""

import subprocess
import sys

import pytest

from esa.util import memory

FRAGMENTED = """
import gc
from pathlib import Path

import torch

from esa.util.memory import trim_heap


def rss_mib():
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


torch.empty(8 << 20, dtype=torch.uint8)  # freed at once: glibc's mmap threshold rises above 2 MB
big, small = [], []
for _ in range(200):  # 400 MiB on the heap, each block followed by a live 1 KiB one
    big.append(torch.ones(2 << 20, dtype=torch.uint8))
    small.append(torch.ones(1024, dtype=torch.uint8))
del big
gc.collect()
before = rss_mib()
released = trim_heap()
print(released, round(before - rss_mib()))
"""


@pytest.mark.skipif(memory._malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_trim_heap_returns_freed_tensors_to_the_os():
    """Tensors freed between live small ones leave holes that glibc keeps resident (score tensors
    of one weight matrix sit below its mmap threshold); trim_heap releases them. In a fresh
    interpreter, so no earlier test has shaped the heap."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, check=True)
    released, dropped_mib = out.stdout.split()
    assert released == "True" and int(dropped_mib) > 200


@pytest.mark.skipif(memory._vm_hwm() is None, reason="needs /proc (Linux)")
def test_ram_room_is_the_limit_minus_the_resident_set():
    rss = memory._field(memory._STATUS, "VmRSS")
    room = memory.ram_room(rss + (1 << 30))
    assert room is not None and abs(room - (1 << 30)) < (64 << 20)  # the resident set moved a little
    assert memory.ram_room(1) < 0  # a limit below what the process holds leaves no room
    available = memory.ram_room()
    assert available is not None and available > 0
