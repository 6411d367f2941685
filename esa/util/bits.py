"""Raw bits of float tensors: same-width integer views, checksums and bit widths.

>>> import torch
>>> bit_width(torch.bfloat16), bit_width(torch.float32)
(16, 32)
>>> bits_view(torch.tensor([1.0])).item() == 0x3F800000
True
"""

from __future__ import annotations

import torch

INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SUM_CHUNK = 1 << 24


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty(0, dtype=dtype).element_size()


def bit_width(dtype: torch.dtype) -> int:
    """Bits per element of `dtype` (32 for fp32, 16 for bf16/fp16)."""
    return 8 * itemsize(dtype)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as a same-width integer view (no copy)."""
    return t.view(INT_VIEW[itemsize(t.dtype)])


def bits_checksum(param: torch.Tensor) -> int:
    """Sum of the tensor's integer view as int64, in chunks (no full-size int64 temporary)."""
    bits = bits_view(param.data.reshape(-1))
    if bits.numel() <= _SUM_CHUNK:
        return int(bits.sum(dtype=torch.int64))
    total = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _SUM_CHUNK):
        total += bits[start : start + _SUM_CHUNK].sum(dtype=torch.int64)
    return int(total)
