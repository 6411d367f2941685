"""Single-weight edits of a super weight and the controls of Yu et al. (2024), one evaluation each.

A *site* is ``(tensor name, flat index)`` (or anything with ``param_name`` and ``flat_index``, e.g. a
``SuperWeight`` of ``esa.analyses.detect``). Every edit goes through ``esa.perturb.perturbed`` (in
place, restored bit-exactly and verified on exit) and every evaluation is ``esa.evaluate.evaluate``
on the same windows, so the per-window mean NLLs of all conditions are paired:

- ``scale_sweep``: the weight w scaled by each factor f (w -> f·w; f = 0 removes it, f = 1 is the
  unperturbed model), the paper's sweep of the super weight over factors 0..3.
- ``random_weight_null``: n distinct entries of the site's tensor drawn uniformly among its non-zero
  entries other than the site (seeded), each zeroed alone: the null distribution of single-weight
  ΔPPL that the super weight's ΔPPL is compared with (an empirical p-value needs n >= 1/alpha - 1).
- ``magnitude_control``: the k largest-|w| entries of the scored tensors other than the site (the
  paper's "Prune Non-SW" control: removing many large weights that are not the super weight).

``plot_scale_sweep`` draws ΔPPL(f) = PPL(f) − PPL(1) with window-bootstrap CIs; ``plot_null`` the
null's ΔPPL values against the super weight's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from esa import plots
from esa.errors import ConfigError
from esa.evaluate import EvalResult, evaluate
from esa.perturb import perturbed
from esa.select import Selection, select
from esa.util.sampling import sample_accepted, tensor_seed

SWEEP_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)

__all__ = [
    "SWEEP_FACTORS",
    "magnitude_control",
    "plot_null",
    "plot_scale_sweep",
    "random_weight_null",
    "scale_sweep",
    "site_of",
]


def site_of(candidate) -> tuple[str, int]:
    """``(tensor name, flat index)`` of a site tuple or of an object with param_name/flat_index."""
    if isinstance(candidate, tuple):
        name, flat = candidate
        return str(name), int(flat)
    return str(candidate.param_name), int(candidate.flat_index)


def _param(lm, name: str) -> torch.nn.Parameter:
    params = dict(lm.model.named_parameters())
    if name not in params:
        raise ConfigError(f"{name!r} is not a parameter of {lm.name!r}; pass a site of this model")
    return params[name]


def _run(lm, eval_ids, batch_size: int, selection=None, method: str = "zero", scale=None) -> EvalResult:
    if selection is None:
        return evaluate(lm.model, eval_ids, batch_size, progress=False)
    with perturbed(lm.model, selection, method, scale=scale):
        return evaluate(lm.model, eval_ids, batch_size, progress=False)


def _result(res: EvalResult) -> dict:
    return {"ppl": float(res.ppl), "window_nll": [float(v) for v in res.window_nll]}


def scale_sweep(
    lm,
    candidate,
    eval_ids: torch.Tensor,
    factors: Sequence[float] = SWEEP_FACTORS,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """PPL and per-window NLL with the site's weight w replaced by f·w, for each factor f.

    f = 1 evaluates the unperturbed model (no edit). Factors must be finite and >= 0. Returns plain
    types: tensor, flat_index, weight (w), factors, ppl [F], window_nll [F][W].
    """
    name, flat = site_of(candidate)
    fs = [float(f) for f in factors]
    if not fs or not all(math.isfinite(f) and f >= 0 for f in fs):
        raise ConfigError(f"scale factors must be finite and >= 0, got {list(factors)}; e.g. (0, 0.5, 1, 2)")
    param = _param(lm, name)
    sel = {name: torch.tensor([flat], dtype=torch.long)}
    rows = []
    for f in tqdm(fs, desc=f"scale sweep {lm.name}", disable=not progress, leave=False):
        edit = None if f == 1.0 else sel
        rows.append(_result(_run(lm, eval_ids, batch_size, edit, "scale", f)))
    return {
        "tensor": name,
        "flat_index": flat,
        "weight": float(param.detach().reshape(-1)[flat]),
        "factors": fs,
        "ppl": [r["ppl"] for r in rows],
        "window_nll": [r["window_nll"] for r in rows],
    }


def random_weight_null(
    lm,
    candidate,
    eval_ids: torch.Tensor,
    n: int = 100,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Zero each of ``n`` random single weights of the site's tensor alone; their PPLs.

    The entries are distinct, uniform among the tensor's non-zero entries other than the site
    (zeroing a zero changes nothing), drawn with ``tensor_seed(seed, name)``. Returns plain types:
    tensor, indices [n], ppl [n], window_nll [n][W].
    """
    name, flat = site_of(candidate)
    values = _param(lm, name).detach().reshape(-1)
    nonzero = values != 0
    count = int(nonzero.sum()) - int(bool(nonzero[flat]))
    if not 1 <= int(n) <= count:
        raise ConfigError(
            f"n = {n} random weights requested from {name!r}, which has {count} others; lower n"
        )

    def accept(pos: torch.Tensor) -> torch.Tensor:
        return nonzero[pos].cpu() & (pos != flat)

    def enumerate_all() -> torch.Tensor:
        idx = nonzero.nonzero().flatten().cpu()
        return idx[idx != flat]

    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    picks = sample_accepted(values.numel(), int(n), gen, count, accept, enumerate_all).tolist()
    rows = [
        _result(_run(lm, eval_ids, batch_size, {name: torch.tensor([int(i)])}))
        for i in tqdm(picks, desc=f"random weights {lm.name}", disable=not progress, leave=False)
    ]
    return {
        "tensor": name,
        "indices": [int(i) for i in picks],
        "ppl": [r["ppl"] for r in rows],
        "window_nll": [r["window_nll"] for r in rows],
    }


def magnitude_control(lm, candidate, k: int, names: Sequence[str] | None = None) -> Selection:
    """The ``k`` largest-|w| entries over ``names`` (default: the scorable tensors), never the site.

    One global ranking of |w| (``esa.select.select``, streaming); ties broken with seed 0."""
    name, flat = site_of(candidate)
    names = list(names) if names is not None else lm.param_map.scorable()
    params = dict(lm.model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"{missing[0]!r} is not a parameter of {lm.name!r}")
    mags = {n: params[n].detach().abs().float() for n in names}
    eligible = {}
    if name in mags:
        mask = torch.ones_like(mags[name], dtype=torch.bool)
        mask.view(-1)[flat] = False
        eligible[name] = mask
    return select(mags, int(k), "top", "global", metric="magnitude", eligible=eligible)


def plot_scale_sweep(factors, delta_ppl, ci=None, *, failure_delta: float | None = None, title: str = ""):
    """ΔPPL(f) = PPL(f) − PPL(1) vs the scale factor f (symlog y: ΔPPL spans signs and decades),
    with CI bars ``ci`` [(lo, hi)] where finite; ``failure_delta`` draws the catastrophe line."""
    x, y = np.asarray(factors, dtype=float), np.asarray(delta_ppl, dtype=float)
    fig, ax = plots.figure(6.5, 4.2)
    ok = np.isfinite(y)
    if ci is not None:
        lo, hi = (np.asarray(c, dtype=float) for c in zip(*ci))
        bars = ok & np.isfinite(lo) & np.isfinite(hi)
        err = np.vstack([y[bars] - lo[bars], hi[bars] - y[bars]]).clip(min=0)
        ax.errorbar(x[bars], y[bars], yerr=err, fmt="none", ecolor="#57606a", capsize=3)
    ax.plot(x[ok], y[ok], marker="o", color="#0969da", label="ΔPPL (95% CI over windows)")
    if (~ok).any():
        top = float(np.nanmax(np.abs(y[ok]))) * 10 if ok.any() else 10.0
        ax.scatter(x[~ok], np.full(int((~ok).sum()), top), marker="x", color="#cf222e", label="non-finite")
    if failure_delta is not None and math.isfinite(failure_delta):
        ax.axhline(failure_delta, color="#cf222e", ls="--", lw=1, label="catastrophe threshold")
        ax.set_ylim(top=max(ax.get_ylim()[1], 3 * failure_delta))
    ax.axvline(1.0, color="#57606a", ls=":", lw=1)
    ax.axhline(0.0, color="#57606a", lw=0.8)
    ax.set_yscale("symlog", linthresh=plots.symlog_threshold(y[ok]))
    ax.set_xlabel("super weight scale factor f (w -> f·w)")
    ax.set_ylabel("ΔPPL = PPL(f) − PPL(1)")
    ax.set_title(title or "super-weight scale sweep")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_null(null_delta, observed: float, *, label: str = "super weight", title: str = ""):
    """The null's ΔPPL values (one dot each, jittered) and the observed ΔPPL, symlog x."""
    null = np.asarray(null_delta, dtype=float)
    fig, ax = plots.figure(6.5, 2.8)
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, null.size)
    ok = np.isfinite(null)
    ax.scatter(
        null[ok], jitter[ok], s=10, color="#57606a", alpha=0.7, label=f"{int(ok.sum())} random weights"
    )
    if math.isfinite(observed):
        ax.axvline(observed, color="#cf222e", lw=2, label=f"{label}: ΔPPL {observed:.4g}")
    ax.set_xscale("symlog", linthresh=plots.symlog_threshold(np.append(null[ok], observed)))
    ax.set_yticks([])
    ax.set_xlabel("ΔPPL of zeroing one weight")
    ax.set_title(title or "single-weight null")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig
