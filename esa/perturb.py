"""In-place perturbations of selected weight entries, undone bit-exactly on exit.

``perturbed`` snapshots the selected entries (and an integer checksum of every touched tensor)
before changing anything, and in ``finally`` writes the snapshot back and verifies it bitwise;
a failed verification raises ``RestoreError``. Only the selected entries are copied.
adaptive_noise, magnitude_scaling and quantization(_per_row) live in ``esa.perturb_extra``.

Registry defaults (callers resolve them, ``perturbed`` never fills them in): gauss_noise
σ = 0.02·|w| (``resolve_scale``), scale factor 0; hit probability 0.05 for bit_flip and 1 for
the others (``resolve_prob``). ``changeable`` gives the entries a method actually changes (zero,
sign_flip, gauss_noise, scale: w ≠ 0; none at gauss σ = 0 or scale factor 1; bit_flip: all).

Bit positions (``bit_position``; bit 0 = least significant bit of the integer view; m = mantissa
bits: 23 fp32, 7 bf16, 10 fp16, 52 fp64): ``sign`` = width − 1, ``exponent_msb`` = width − 2
(``default_bit``), ``exponent_lsb`` = m (the lowest exponent bit: |w| doubles or halves),
``mantissa_msb`` (alias ``mantissa``) = m − 1 (×1.5 or ×2/3 or so), ``mantissa_lsb`` = 0 (one ulp).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from esa.errors import ConfigError, RestoreError
from esa.perturb_extra import register_extra
from esa.util.bits import bit_width, bits_checksum, bits_view
from esa.util.sampling import tensor_seed

POSITIONS = ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb", "mantissa", "mantissa_lsb")
Changes = Callable[[torch.Tensor, "float | None"], torch.Tensor]  # (weights, scale) -> bool mask


@dataclass(frozen=True)
class Perturbation:
    """A registered method: ``fn(values, *, scale, bit, generator) -> new values``.

    ``default_scale`` / ``default_prob`` are what callers use when they give none
    (`resolve_scale`, `resolve_prob`); `perturbed` itself never fills them in. ``changes(w, scale)``
    marks the entries the method changes (None: every entry)."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs_scale: bool = False
    positive_scale: bool = False
    uses_bit: bool = False
    default_scale: float | None = None
    random: bool = False  # draws random numbers (its result depends on the seed)
    default_prob: float = 1.0
    changes: Changes | None = None

    def __call__(self, values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(values, **kwargs)


PERTURBATIONS: dict[str, Perturbation] = {}


def register_perturbation(
    name: str,
    *,
    needs_scale: bool = False,
    positive_scale: bool = False,
    uses_bit: bool = False,
    default_scale: float | None = None,
    random: bool = False,
    default_prob: float = 1.0,
    changes: Changes | None = None,
):
    """Decorator registering ``fn(values, *, scale, bit, generator, weights, index)`` under ``name``.

    ``values`` is a 1-D tensor of the selected entries (parameter dtype and device); ``fn``
    returns the new values with the same dtype and shape and must not modify ``values`` (nor
    ``weights``, the whole unperturbed tensor; ``index``: the selected flat indices).
    """

    def decorate(fn):
        PERTURBATIONS[name] = Perturbation(
            name, fn, needs_scale, positive_scale, uses_bit, default_scale, random, default_prob, changes
        )
        return fn

    return decorate


def resolve_scale(method: str, scale: float | None = None) -> float | None:
    """``scale`` when given, else the method's registered ``default_scale`` (None for methods
    without a scale): gauss_noise σ = 0.02 x |w|, scale factor 0.0. ConfigError if unknown."""
    return _spec(method).default_scale if scale is None else scale


def resolve_prob(method: str, prob: float | None = None) -> float:
    """``prob`` when given, else the method's ``default_prob``: 0.05 for bit_flip (each selected
    weight is hit with probability 0.05), 1.0 for the others. ConfigError if unknown."""
    return _spec(method).default_prob if prob is None else prob


def _spec(method: str) -> Perturbation:
    if method not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation {method!r}; use one of {', '.join(sorted(PERTURBATIONS))}")
    return PERTURBATIONS[method]


class Changeable(Mapping[str, torch.Tensor]):
    """name -> bool mask of the entries ``method`` changes, computed on access from the current
    weights (one tensor's mask at a time: no second model-sized copy is kept)."""

    def __init__(self, params: Mapping[str, torch.Tensor], spec: Perturbation, scale: float | None):
        self.params, self.spec, self.scale = params, spec, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        w = self.params[name].detach()
        if self.spec.changes is None:
            return torch.ones_like(w, dtype=torch.bool)
        return torch.as_tensor(self.spec.changes(w, self.scale), device=w.device).expand(w.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def changeable(params_or_model, method: str, names=None, scale: float | None = None) -> Changeable:
    """The entries that ``method`` (with ``scale``, default `resolve_scale`) actually changes, as a
    lazy mapping name -> bool mask of the parameter's shape and device, over ``names`` (default:
    every parameter). zero, sign_flip, gauss_noise (σ ∝ |w|) and scale change w ≠ 0 only (none at
    σ = 0 or factor 1); bit_flip changes every entry. Controls are drawn among these
    (``esa.select.select(..., eligible=changeable(...))``)."""
    spec = _spec(method)
    params = _as_params(params_or_model)
    if names is not None:
        missing = [n for n in names if n not in params]
        if missing:
            raise ConfigError(f"unknown parameter name(s) {missing[:3]}: use names of the model's parameters")
        params = {n: params[n] for n in names}
    return Changeable(params, spec, resolve_scale(method, scale))


@dataclass
class PerturbInfo:
    """What a perturbation did: entries selected, entries whose bits changed, tensors touched.

    ``verified`` becomes True on exit once the restore has been checked bit-exact.
    """

    method: str
    n_selected: int
    n_changed: int
    params: tuple[str, ...]
    verified: bool = False


def default_bit(dtype: torch.dtype) -> int:
    """The exponent's most significant bit: 30 (fp32), 14 (fp16/bf16), 62 (fp64)."""
    return bit_width(dtype) - 2


def bit_position(position: str | int | None, dtype: torch.dtype) -> int:
    """The bit index of ``position`` (one of ``POSITIONS``, see the module docstring) in
    ``dtype``; ints pass through (range-checked), None = ``exponent_msb``."""
    if not dtype.is_floating_point:
        raise ConfigError(f"bit flips need a floating-point dtype, not {dtype}")
    nbits, mantissa = bit_width(dtype), round(-math.log2(torch.finfo(dtype).eps))
    if isinstance(position, bool) or not isinstance(position, (int, str, type(None))):
        raise ConfigError(f"bit must be an integer or one of {', '.join(POSITIONS)}, got {position!r}")
    if isinstance(position, int):
        if not 0 <= position < nbits:
            raise ConfigError(f"bit={position} out of range for {dtype}; use 0..{nbits - 1}")
        return position
    named = {
        None: nbits - 2,
        "sign": nbits - 1,
        "exponent_msb": nbits - 2,
        "exponent_lsb": mantissa,
        "mantissa_msb": mantissa - 1,
        "mantissa": mantissa - 1,
        "mantissa_lsb": 0,
    }
    if position not in named:
        raise ConfigError(f"unknown bit position {position!r}; use an int or one of {', '.join(POSITIONS)}")
    return named[position]


def _nonzero(w: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return w != 0


@register_perturbation("zero", changes=_nonzero)
def _zero(values, **_):
    return torch.zeros_like(values)


@register_perturbation("sign_flip", changes=_nonzero)
def _sign_flip(values, **_):
    return _xor_bit(values, bit_width(values.dtype) - 1)


@register_perturbation(
    "gauss_noise",
    needs_scale=True,
    positive_scale=True,
    default_scale=0.02,
    random=True,
    changes=lambda w, scale: (w != 0) & (scale != 0),
)
def _gauss_noise(values, *, scale, generator, **_):
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    noise = torch.randn(values.numel(), generator=generator, dtype=compute).to(values.device)
    w = values.to(compute)
    return (w + scale * w.abs() * noise).to(values.dtype)


@register_perturbation("scale", needs_scale=True, default_scale=0.0, changes=lambda w, s: (w != 0) & (s != 1))
def _scale(values, *, scale, **_):
    compute = torch.float64 if values.dtype == torch.float64 else torch.float32
    return (values.to(compute) * scale).to(values.dtype)


@register_perturbation("bit_flip", uses_bit=True, default_prob=0.05)
def _bit_flip(values, *, bit, **_):
    return _xor_bit(values, bit)


register_extra(register_perturbation, PERTURBATIONS)  # adaptive_noise, magnitude_scaling, quantization*


@contextlib.contextmanager
def perturbed(
    model_or_params,
    selection,
    method: str,
    *,
    scale: float | None = None,
    prob: float = 1.0,
    bit: int | str | None = None,
    seed: int = 0,
) -> Iterator[PerturbInfo]:
    """Apply ``method`` in place to the selected entries; restore and verify them on exit.

    ``model_or_params`` is an ``nn.Module`` or a dict name -> Parameter; ``selection`` is a
    ``Selection`` (or a dict name -> flat indices). Each selected entry is perturbed with
    probability ``prob`` (seeded). ``bit`` is used by ``bit_flip``: an index or a name of
    ``POSITIONS`` resolved per parameter dtype (default: exponent MSB).
    """
    spec = _check_options(method, scale, prob, bit)
    plan = _plan(_as_params(model_or_params), selection)
    if spec.uses_bit:
        for name, param, _ in plan:
            _resolve_bit(bit, param.dtype, name)
    with torch.no_grad():
        saved = _snapshot(plan)
    info = None
    try:
        with torch.no_grad():
            info = _apply(plan, spec, scale=scale, prob=prob, bit=bit, seed=seed)
        yield info
    finally:
        with torch.no_grad():
            _restore(saved)
            _verify(saved)
        if info is not None:
            info.verified = True


def _check_options(method, scale, prob, bit) -> Perturbation:
    spec = _spec(method)
    if spec.needs_scale:
        if scale is None:
            raise ConfigError(f"perturbation {method!r} needs scale=; pass e.g. scale=0.5")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"scale must be a finite number, got {scale!r}; pass e.g. scale=0.5")
        if spec.positive_scale and scale <= 0:
            raise ConfigError(f"{method} scale must be > 0, got {scale}; pass e.g. scale=0.5")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ConfigError(f"prob must be in [0, 1], got {prob!r}; pass e.g. prob=1.0")
    named = isinstance(bit, str) and bit in POSITIONS
    if (
        spec.uses_bit
        and bit is not None
        and not named
        and (isinstance(bit, bool) or not isinstance(bit, int))
    ):
        raise ConfigError(
            f"bit must be an integer or one of {', '.join(POSITIONS)}, got {bit!r}; pass e.g. bit=30 for fp32"
        )
    return spec


def _resolve_bit(bit: int | str | None, dtype: torch.dtype, name: str) -> int:
    """The bit index for parameter ``name`` (ConfigError naming it when out of range)."""
    if isinstance(bit, int) and not isinstance(bit, bool):
        nbits = bit_width(dtype)
        if not 0 <= bit < nbits:
            raise ConfigError(f"bit={bit} out of range for {name!r} ({dtype}); use 0..{nbits - 1}")
        return bit
    return bit_position(bit, dtype)


def _as_params(model_or_params) -> dict[str, torch.Tensor]:
    if isinstance(model_or_params, torch.nn.Module):
        return dict(model_or_params.named_parameters())
    if isinstance(model_or_params, Mapping):
        return dict(model_or_params)
    raise ConfigError("perturbed() needs an nn.Module or a dict name -> Parameter")


def _selection_indices(selection) -> Mapping[str, torch.Tensor]:
    indices = getattr(selection, "indices", selection)
    if not isinstance(indices, Mapping):
        raise ConfigError("perturbed() needs a Selection or a dict name -> flat indices")
    return indices


def _plan(params, selection) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, param, unique sorted flat indices on the param's device) per distinct tensor.

    Names that alias the same tensor view (tied weights passed twice) are merged into one entry.
    """
    merged: dict[tuple, list] = {}
    for name, idx in _selection_indices(selection).items():
        if name not in params:
            raise ConfigError(f"selected tensor {name!r} is not a parameter of the model; reselect")
        param = params[name]
        if not param.dtype.is_floating_point:
            raise ConfigError(f"parameter {name!r} has dtype {param.dtype}; only float weights")
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0:
            continue
        if int(idx.min()) < 0 or int(idx.max()) >= param.numel():
            raise ConfigError(f"selected index out of range for {name!r} ({param.numel()} entries)")
        key = (param.data_ptr(), param.dtype, tuple(param.shape), param.stride(), str(param.device))
        if key in merged:
            merged[key][2] = torch.cat([merged[key][2], idx])
        else:
            merged[key] = [name, param, idx]
    return [(n, p, torch.unique(i).to(p.device)) for n, p, i in merged.values()]


def _gather(param: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    data = param.data
    if data.is_contiguous():
        return data.view(-1)[idx].clone()
    return data[torch.unravel_index(idx, data.shape)].clone()


def _scatter(param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    data = param.data
    if data.is_contiguous():
        data.view(-1)[idx] = values
    else:
        data[torch.unravel_index(idx, data.shape)] = values


def _snapshot(plan) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    return [(n, p, idx, _gather(p, idx), bits_checksum(p)) for n, p, idx in plan]


def _apply(plan, spec: Perturbation, *, scale, prob, bit, seed) -> PerturbInfo:
    n_selected = n_changed = 0
    for name, param, idx in plan:
        gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        old = _gather(param, idx)
        used_bit = _resolve_bit(bit, param.dtype, name) if spec.uses_bit else None
        new = spec(old, scale=scale, bit=used_bit, generator=gen, weights=param.data, index=idx)
        if new.dtype != old.dtype or new.shape != old.shape:
            raise ConfigError(f"perturbation {spec.name!r} returned {new.dtype}{tuple(new.shape)}")
        if prob < 1.0:
            hit = torch.rand(old.numel(), generator=gen) < prob
            new = torch.where(hit.to(old.device), bits_view(new), bits_view(old)).view(old.dtype)
        _scatter(param, idx, new)
        n_selected += int(idx.numel())
        n_changed += int((bits_view(new) != bits_view(old)).sum())
    return PerturbInfo(spec.name, n_selected, n_changed, tuple(n for n, _, _ in plan))


def _restore(saved) -> None:
    for _, param, idx, original, _ in reversed(saved):
        _scatter(param, idx, original)


def _verify(saved) -> None:
    for name, param, idx, original, checksum in saved:
        now = _gather(param, idx)
        if not torch.equal(bits_view(now), bits_view(original)) or bits_checksum(param) != checksum:
            raise RestoreError(f"restore of {name!r} was not bit-exact; this is an esa bug, report it")


def _xor_bit(values: torch.Tensor, bit: int) -> torch.Tensor:
    nbits = bit_width(values.dtype)
    mask = 1 << bit
    if mask >= 1 << (nbits - 1):
        mask -= 1 << nbits
    return (bits_view(values.contiguous()) ^ mask).view(values.dtype)
