"""Controls for super-weight candidates: their rank under a sensitivity metric, a random weight
of the same tensor, and the super-activation control (Yu et al. 2024): PPL with the super weight
zeroed, and zeroed with the *super activation* written back (see ``super_activation_control``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from esa.analyses.detect_report import SuperWeight, SuperWeightReport, selection_of
from esa.errors import ConfigError
from esa.evaluate import evaluate
from esa.perturb import perturbed
from esa.select import Selection


@dataclass
class ControlResult:
    """PPL of the super-activation control (plain Python numbers)."""

    ppl_baseline: float
    ppl_zeroed: float
    ppl_restored: float
    nll_baseline: float
    nll_zeroed: float
    nll_restored: float
    positions: str
    spike_threshold: float
    n_restored: int
    n_positions: int
    candidates: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def random_weight_selection(lm, candidates: Sequence[SuperWeight], seed: int = 0) -> Selection:
    """One uniformly random entry of each candidate's tensor (never the candidate itself), seeded."""
    params = dict(lm.model.named_parameters())
    gen = torch.Generator().manual_seed(int(seed))
    picks, shapes = [], {}
    for c in candidates:
        numel = params[c.param_name].numel()
        flat = c.flat_index
        while flat == c.flat_index:
            flat = int(torch.randint(0, numel, (1,), generator=gen))
        shapes[c.param_name] = tuple(params[c.param_name].shape)
        picks.append(SuperWeight(c.layer, c.param_name, c.module, -1, -1, None, flat, 0.0, 0.0, 0.0, -1))
    return selection_of(picks, shapes, f"random(seed={seed})", {})


# --- ranks -------------------------------------------------------------------------------------


def rank_under_metric(scores: dict[str, torch.Tensor], param_name: str, flat_index: int) -> int:
    """Rank of ``scores[param_name].reshape(-1)[flat_index]`` among all scored entries of all
    tensors: 1 + the number of entries strictly greater (streaming, tensor by tensor). A NaN
    score ranks after every non-NaN entry."""
    if param_name not in scores:
        raise ConfigError(f"{param_name!r} was not scored; score it (names=...) before ranking")
    flat = scores[param_name].detach().reshape(-1)
    if not 0 <= int(flat_index) < flat.numel():
        raise ConfigError(f"flat index {flat_index} out of range for {param_name!r} ({flat.numel()} entries)")
    value = float(flat[int(flat_index)])  # exact: every float dtype fits a Python float
    greater = 0
    for s in scores.values():
        s = s.detach().reshape(-1)
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()  # compare in a dtype that holds ``value`` exactly
        elif s.dtype == torch.float32 and flat.dtype == torch.float64:
            s = s.double()
        greater += int((~torch.isnan(s)).sum()) if value != value else int((s > value).sum())
    return greater + 1


# --- super-activation control ------------------------------------------------------------------


def super_activation_control(
    lm,
    candidate,
    eval_ids: torch.Tensor,
    *,
    positions: str = "spike",
    spike_threshold: float = 50.0,
    batch_size: int = 8,
    progress: bool = False,
) -> ControlResult:
    """PPL on ``eval_ids`` of the unperturbed model, with the super weight(s) zeroed, and zeroed with
    the super activation restored.

    ``candidate`` is a ``SuperWeight``, a list of them, or a ``SuperWeightReport``. The baseline
    pass records, per evaluation batch, the output of each candidate's module at the candidate's
    output channel (``row``) for every token: the down projection's output (dense), or the fused
    experts module's combined output (fused experts; the zeroed weight only changes its expert's
    contribution, so the combined channel restores exactly that). The restored pass zeroes the
    weight(s) with ``esa.perturb.perturbed`` and a forward hook writes those recorded values back
    into that output channel, at the positions where ``|recorded| >= spike_threshold``
    (``positions="spike"``: the super activation itself, the paper's control) or at every position
    (``positions="all"``: undoes the weight's whole effect, so PPL returns to the baseline exactly).
    """
    if positions not in ("spike", "all"):
        raise ConfigError(f"positions must be 'spike' or 'all', got {positions!r}")
    cands = _as_candidates(candidate)
    params = dict(lm.model.named_parameters())
    shapes = {c.param_name: tuple(params[c.param_name].shape) for c in cands}
    sel = selection_of(cands, shapes, "super_weight", {})
    modules = dict(lm.model.named_modules())
    rows: dict[str, list[int]] = {}
    for c in cands:
        if c.row not in rows.setdefault(c.module, []):
            rows[c.module].append(c.row)
    recorded: dict[str, list[torch.Tensor]] = {m: [] for m in rows}

    def record(mod_name):
        def hook(mod, args, out):
            recorded[mod_name].append(out.reshape(-1, out.shape[-1])[:, rows[mod_name]].clone())

        return hook

    counts = {"restored": 0, "positions": 0}

    def restore(mod_name):
        calls = iter(recorded[mod_name])

        def hook(mod, args, out):
            try:
                rec = next(calls)
            except StopIteration:
                raise ConfigError("restore pass made more calls than the baseline pass") from None
            flat = out.reshape(-1, out.shape[-1]).clone()
            now = flat[:, rows[mod_name]]
            if now.shape != rec.shape:
                raise ConfigError("restore pass batch shapes differ from the baseline pass")
            mask = (
                torch.ones_like(rec, dtype=torch.bool) if positions == "all" else rec.abs() >= spike_threshold
            )
            flat[:, rows[mod_name]] = torch.where(mask, rec, now)
            counts["restored"] += int(mask.sum())
            counts["positions"] += int(mask.numel())
            return flat.reshape(out.shape)

        return hook

    def run(hook_factory=None):
        hooks = [modules[m].register_forward_hook(hook_factory(m)) for m in rows] if hook_factory else []
        try:
            return evaluate(lm.model, eval_ids, batch_size=batch_size, progress=progress)
        finally:
            for h in hooks:
                h.remove()

    base = run(record)
    with perturbed(lm.model, sel, "zero"):
        zeroed = run()
        restored = run(restore)
    return ControlResult(
        base.ppl,
        zeroed.ppl,
        restored.ppl,
        base.nll,
        zeroed.nll,
        restored.nll,
        positions,
        float(spike_threshold),
        counts["restored"],
        counts["positions"],
        [asdict(c) for c in cands],
    )


def _as_candidates(candidate) -> list[SuperWeight]:
    if isinstance(candidate, SuperWeightReport):
        cands = list(candidate.candidates)
    elif isinstance(candidate, SuperWeight):
        cands = [candidate]
    else:
        cands = list(candidate)
    if not cands or not all(isinstance(c, SuperWeight) for c in cands):
        raise ConfigError(
            "super_activation_control needs at least one SuperWeight candidate; "
            "run detect_super_weights first (it found none?)"
        )
    return cands
