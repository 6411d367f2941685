"""Eligibility masks kept by what they exclude: the entries a control may be drawn from.

A control set (random_k, bottom_k) is drawn only among the entries its perturbation changes
(``esa.perturb.changeable``); for zero, sign_flip and gauss_noise that is every w ≠ 0, so a mask
excludes the exact zeros of a tensor: usually none or a few (a dequantized GGUF model has ~30 k
in 106 M). `Eligibility` freezes such masks once, stores only the excluded positions, and lists
only the tensors that exclude something, so ``esa.select`` treats the others as all eligible and
never builds or scans a mask for them. Its ``digest`` names the excluded set: perturbations that
exclude the same entries (zero, sign_flip and gauss_noise at every σ > 0) give the same digest,
hence the same selections.

>>> import torch
>>> e = Eligibility.of({"a": torch.tensor([True, False, True]), "b": torch.ones(2, dtype=torch.bool)})
>>> list(e), e["a"].tolist(), e.get("b") is None, e.excluded("a").tolist()
(['a'], [True, False, True], True, [1])
>>> e.digest == Eligibility.of({"a": torch.tensor([True, False, True])}).digest
True
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping

import torch


class Eligibility(Mapping[str, torch.Tensor]):
    """name -> bool mask (True: may be selected) for the tensors that exclude at least one entry,
    kept as the excluded flat positions (or the mask itself, where that is smaller)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], excluded: dict[str, torch.Tensor]):
        self.shapes = shapes  # name -> shape, for the names in `excluded`
        self._excluded = excluded  # name -> ascending flat positions (int64) or a flat bool mask

    @classmethod
    def of(cls, masks: Mapping[str, torch.Tensor]) -> Eligibility:
        """Freeze ``masks`` (name -> bool mask, e.g. a lazy ``changeable`` mapping: one pass,
        one tensor's mask at a time)."""
        shapes, excluded = {}, {}
        for name in masks:
            mask = masks[name].detach()
            out = (~mask).reshape(-1).nonzero().flatten()
            if out.numel() == 0:
                continue
            shapes[name] = tuple(int(d) for d in mask.shape)
            small = out.numel() * out.element_size() < mask.numel()
            excluded[name] = out if small else mask.reshape(-1).clone()
        return cls(shapes, excluded)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._excluded[name]
        if stored.dtype == torch.bool:
            return stored.view(self.shapes[name])
        mask = torch.ones(self.shapes[name], dtype=torch.bool, device=stored.device)
        mask.view(-1)[stored] = False
        return mask

    def __iter__(self) -> Iterator[str]:
        return iter(self._excluded)

    def __len__(self) -> int:
        return len(self._excluded)

    def excluded(self, name: str) -> torch.Tensor:
        """Ascending flat positions that ``name`` excludes (empty for an absent name)."""
        stored = self._excluded.get(name)
        if stored is None:
            return torch.empty(0, dtype=torch.long)
        return (~stored).nonzero().flatten() if stored.dtype == torch.bool else stored

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the names and excluded positions: equal digests, equal eligibility."""
        h = hashlib.sha256()
        for name in sorted(self._excluded):
            h.update(f"{name}{self.shapes[name]}".encode())
            h.update(self.excluded(name).cpu().numpy().tobytes())
        return h.hexdigest()
