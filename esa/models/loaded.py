"""A loaded model: module (eval mode), tokenizer, parameter map and provenance; weight digests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from esa.errors import ModelError
from esa.models.params import ParamMap, build_param_map
from esa.util.bits import bits_checksum


@dataclass
class LoadedModel:
    """A model ready for analysis: module (eval mode), tokenizer, parameter map and provenance."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    source: str  # "tiny" | "embedded" | "gguf" | "local" | "hub" | "arch"
    param_map: ParamMap
    dtype: torch.dtype
    device: torch.device
    identity: dict = field(default_factory=dict)  # what makes its weights unique (for caches)

    def fingerprint(self) -> str:
        """A digest of every weight's bits (computed once), for cache keys."""
        if "fingerprint" not in self.identity:
            self.identity["fingerprint"] = weights_digest(self.model)
        return self.identity["fingerprint"]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        """Plain-typed summary for manifests."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "num_parameters": self.num_parameters,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            **{k: v for k, v in self.identity.items() if k != "name"},
        }


def weights_digest(model: torch.nn.Module) -> str:
    """A cheap digest of every parameter's bits: per tensor the int64 sum of its integer view."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            digest.update(f"{pname}:{tuple(p.shape)}:{p.dtype}:{bits_checksum(p.detach())};".encode())
    return digest.hexdigest()[:32]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the raw bytes of every parameter (exact; for restore checks)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            digest.update(pname.encode())
            digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(lm: LoadedModel) -> None:
    """Raise ModelError if any parameter holds NaN or inf (one host sync per device)."""
    flags: dict = {}
    with torch.no_grad():
        for p in lm.model.parameters():
            ok = torch.isfinite(p).all()
            flags[p.device] = ok if p.device not in flags else flags[p.device] & ok
    if all(bool(v) for v in flags.values()):
        return
    for pname, p in lm.model.named_parameters():
        if not torch.isfinite(p).all():
            raise ModelError(f"model {lm.name!r} has NaN/inf weights in {pname}: re-export or re-download it")


def from_module(name: str, model: torch.nn.Module, tokenizer, source: str, identity=None) -> LoadedModel:
    """Wrap an existing module (e.g. built in a test) as a LoadedModel."""
    p = next(model.parameters())
    return LoadedModel(
        name, model, tokenizer, source, build_param_map(model), p.dtype, p.device, identity or {"name": name}
    )
