"""Tamper detection from sensitivity maps: which tensors and weights of a suspect checkpoint moved
in sensitivity beyond calibration noise, compared with a reference checkpoint.

Both checkpoints are scored by one metric on the same calibration windows (``S_ref``, ``S_sus``;
name -> tensor, as ``esa.metrics.compute_scores`` returns). A third map ``S_noise`` scores the
reference on a *different* calibration draw; for tensor t the noise floor is

    τ_t = max_i |S_noise(i) − S_ref(i)|,

the largest shift that re-drawing the calibration text alone produces in that tensor. Entry i of
tensor t has the exceedance ``e_i = |S_sus(i) − S_ref(i)| / τ_t`` (with τ_t = 0: inf where the
entry moved, 0 where it did not) and is *detected* when ``e_i > margin``. A tensor's exceedance is
its largest entry's. Entries rank by e over all tensors (rank = 1 + the number of entries with a
strictly larger e; within a tensor, whose entries share τ, by the shift), tensors by their
exceedance. Nothing here concatenates all scores: every statistic is taken tensor by tensor.

Which metric: a weight change moves ``act_mag`` (|w| x input norm) at the changed entry by |Δw|
times its input norm and elsewhere only through downstream activations, so its map locates a
change; ``grad_x_weight`` (|w·g|) moves at every entry whose gradient the change disturbs, and a
changed weight with a small gradient hides (smollm2-135m: a 10x-RMS plant in a q_proj ranked 83rd,
one in an up_proj 52,896th, 2026-12-02).

``plant_site`` / ``planted`` make the controlled modification of the claims: one seeded random
non-zero weight of a seeded random scored tensor set to ``size`` x the tensor's RMS (sign kept),
through ``esa.perturb.perturbed`` (restored bit-exactly on exit).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from esa import plots
from esa.errors import ConfigError
from esa.perturb import perturbed
from esa.util.sampling import tensor_seed

Scores = Mapping[str, torch.Tensor]

__all__ = ["TamperReport", "compare_scores", "noise_floor", "plant_site", "planted", "plot_tamper"]


@dataclass
class TamperReport:
    """The comparison of a suspect's score map with a reference's (plain Python values).

    tensors: one row per tensor, largest exceedance first: tensor, exceedance, n_detected,
    noise_floor, max_shift. top: the ``top`` entries of largest exceedance over all tensors:
    tensor, flat_index, shift, exceedance, rank. watched: ``"name[flat]"`` -> rank, exceedance,
    shift, tensor_rank of each entry asked for (``watch=``)."""

    margin: float
    n_entries: int
    n_detected: int
    max_exceedance: float
    tensors: list[dict]
    top: list[dict]
    watched: dict[str, dict] = field(default_factory=dict)

    @property
    def detected(self) -> bool:
        return self.n_detected > 0

    def to_dict(self) -> dict:
        return asdict(self)


def _check(ref: Scores, other: Scores, what: str) -> None:
    if set(other) != set(ref):
        extra = sorted(set(other) ^ set(ref))
        raise ConfigError(
            f"{what} scores name other tensors than the reference ({extra[:3]}); score the same names"
        )
    for name, s in ref.items():
        if tuple(other[name].shape) != tuple(s.shape):
            raise ConfigError(
                f"{what} scores of {name!r} have shape {tuple(other[name].shape)}, not {tuple(s.shape)}"
            )


def _finite(name: str, *values: float) -> None:
    """NaN/inf scores show as a non-finite largest shift or noise floor (no extra pass over them)."""
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"scores of {name!r} hold NaN/inf: check the model and the calibration data")


def _shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|b − a| as a flat float tensor (one temporary, made absolute in place)."""
    return (b.detach().float().reshape(-1) - a.detach().float().reshape(-1).to(b.device)).abs_()


def noise_floor(ref: Scores, noise: Scores) -> dict[str, float]:
    """τ_t = max |S_noise − S_ref| per tensor (see the module doc)."""
    _check(ref, noise, "noise")
    return {n: float(_shift(s, noise[n]).max()) if s.numel() else 0.0 for n, s in ref.items()}


def _exceed(shift: torch.Tensor, floor: float) -> torch.Tensor:
    """e = shift / τ (τ = 0: inf where the entry moved, 0 where it did not)."""
    if floor > 0:
        return shift / floor
    return torch.where(shift > 0, torch.full_like(shift, math.inf), torch.zeros_like(shift))


def _above(shift: torch.Tensor, floor: float, level: float) -> int:
    """The number of entries whose exceedance is > level (without dividing the whole tensor)."""
    if floor > 0:
        return int((shift > level * floor).sum())
    return int((shift > 0).sum()) if level < math.inf else 0


def compare_scores(
    ref: Scores,
    suspect: Scores,
    noise: Scores,
    *,
    margin: float = 1.0,
    top: int = 10,
    watch: Sequence[tuple[str, int]] = (),
) -> TamperReport:
    """Locate the entries whose score moved beyond ``margin`` x their tensor's noise floor.

    ``ref``/``suspect``: the two checkpoints' scores on the same calibration windows; ``noise``: the
    reference scored on another calibration draw (module doc). ``watch`` entries (name, flat index)
    get their rank, exceedance and their tensor's rank (by tensor exceedance) reported (e.g. a
    planted change). One pass over the tensors (the watched tensors are read once more first)."""
    if not (math.isfinite(margin) and margin > 0):
        raise ConfigError(f"margin must be finite and > 0, got {margin}; e.g. margin=1")
    _check(ref, suspect, "suspect")
    _check(ref, noise, "noise")
    watched: dict[str, dict[str, Any]] = {}
    for n, i in ((str(n), int(i)) for n, i in watch):
        if n not in ref or not 0 <= i < ref[n].numel():
            raise ConfigError(f"watched entry {n}[{i}] is not a scored entry")
        shift, floor = _shift(ref[n], suspect[n]), float(_shift(ref[n], noise[n]).max())
        _finite(n, float(shift.max()), floor)
        e = float(_exceed(shift[i : i + 1], floor)[0])
        watched[f"{n}[{i}]"] = {"tensor": n, "exceedance": e, "shift": float(shift[i]), "rank": 1}
    rows: list[dict[str, Any]] = []
    tops: list[dict[str, Any]] = []
    for name, s in ref.items():
        shift = _shift(s, suspect[name])
        floor = float(_shift(s, noise[name]).max()) if s.numel() else 0.0
        vals, idx = torch.topk(shift, min(int(top), shift.numel()))
        _finite(name, float(vals[0]) if vals.numel() else 0.0, floor)
        e_top = _exceed(vals, floor).tolist()
        tops += [
            {"tensor": name, "flat_index": int(i), "shift": float(v), "exceedance": e}
            for v, i, e in zip(vals.tolist(), idx.tolist(), e_top)
        ]
        rows.append(
            {
                "tensor": name,
                "exceedance": e_top[0] if e_top else 0.0,
                "n_detected": _above(shift, floor, margin),
                "noise_floor": floor,
                "max_shift": float(vals[0]) if e_top else 0.0,
            }
        )
        for w in watched.values():  # in its own tensor: by the shift (same floor; no rounding)
            mine = w["tensor"] == name
            w["rank"] += int((shift > w["shift"]).sum()) if mine else _above(shift, floor, w["exceedance"])
        del shift
    rows.sort(key=lambda r: -r["exceedance"])
    tops.sort(key=lambda r: (-r["exceedance"], -r["shift"]))
    tops = tops[: int(top)]
    for rank, row in enumerate(tops, 1):
        row["rank"] = rank
    order = [r["tensor"] for r in rows]
    for w in watched.values():
        w["tensor_rank"] = order.index(w["tensor"]) + 1
    return TamperReport(
        float(margin),
        int(sum(s.numel() for s in ref.values())),
        int(sum(r["n_detected"] for r in rows)),
        max((r["exceedance"] for r in rows), default=0.0),
        rows,
        tops,
        watched,
    )


def plant_site(lm, seed: int = 0, names: Sequence[str] | None = None) -> tuple[str, int]:
    """A seeded random scored tensor and a seeded random non-zero entry of it: (name, flat index)."""
    names = sorted(names if names is not None else lm.param_map.scorable())
    if not names:
        raise ConfigError(f"{lm.name!r} has no scored tensor to plant a change in")
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    name = names[int(torch.randint(len(names), (1,), generator=gen))]
    values = dict(lm.model.named_parameters())[name].detach().reshape(-1)
    nonzero = values.nonzero().flatten().cpu()
    if nonzero.numel() == 0:
        raise ConfigError(f"{name!r} is all zeros: no weight to plant a change in; use another seed")
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return name, int(nonzero[int(torch.randint(nonzero.numel(), (1,), generator=gen))])


@contextlib.contextmanager
def planted(lm, site: tuple[str, int], size: float) -> Iterator[dict]:
    """Set the weight at ``site`` to sign(w) x ``size`` x RMS(its tensor) (restored on exit).

    Yields plain values: tensor, flat_index, old, new, size."""
    name, flat = str(site[0]), int(site[1])
    param = dict(lm.model.named_parameters())[name]
    old = float(param.detach().reshape(-1)[flat])
    rms = float(param.detach().float().pow(2).mean().sqrt())
    if old == 0 or not (math.isfinite(size) and size > 0) or rms == 0:
        raise ConfigError(
            f"cannot plant at {name}[{flat}] (w = {old}, size = {size}): pick a non-zero weight, size > 0"
        )
    new = math.copysign(size * rms, old)
    with perturbed(lm.model, {name: torch.tensor([flat])}, "scale", scale=new / old):
        yield {"tensor": name, "flat_index": flat, "old": old, "new": new, "size": float(size)}


def plot_tamper(report: TamperReport, *, highlight: str | None = None, n: int = 20, title: str = ""):
    """Bars of the ``n`` tensors of largest exceedance (log y), the margin line, ``highlight`` red."""
    rows = report.tensors[:n]
    fig, ax = plots.figure(7.0, 4.0)
    y = [r["exceedance"] if math.isfinite(r["exceedance"]) else 0.0 for r in rows]
    floor = min([v for v in y if v > 0] + [report.margin]) / 10
    colors = ["#cf222e" if r["tensor"] == highlight else "#0969da" for r in rows]
    ax.bar(range(len(rows)), [max(v, floor) for v in y], color=colors)
    ax.axhline(report.margin, color="#57606a", ls="--", lw=1, label=f"detection margin {report.margin:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["tensor"].replace("model.", "") for r in rows], rotation=75, fontsize=6)
    ax.set_ylabel("score shift / noise floor")
    ax.set_title(title or f"tamper scan: {report.n_detected} entries detected")
    ax.legend(fontsize=8)
    return fig
