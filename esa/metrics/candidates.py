"""Candidate scores: what a rerun needs of a score set instead of the whole tensors.

Order. ``esa.select`` ranks the entries of tensor t for kind ∈ {top, bottom} and seed s by
key desc (key = score for top, −score for bottom, NaN last), then tie priority(s, t, index)
desc, then index asc: a total order ≺_s.

Lists. For each tensor and kind, a list L of domain D (every entry; and, when the tensor has
zero weights, the entries with w ≠ 0, whose bottom-k the controls of zero / sign_flip /
gauss_noise draw from) holds the first C' = min(C, |D|) entries of D under ≺_s, s = the
calibration seed: ascending flat indices and their scores. A tensor whose lists would cost more
bytes than its scores is kept dense (every score: answers anything). With the shapes, the
``score_summary`` and a uniform sample of the scores (the runbook's histogram), this answers
``esa.select.select`` exactly. For k' entries of a tensor (k' = k per_layer, min(k, eligible)
global) among eligible entries E ⊆ D:

- L = D (complete), or
- selection seed = s and |L ∩ E| ≥ k' (L is a prefix of ≺_s, so the first k' of E lie in it), or
- at least k' entries of L ∩ E have a key above b, the key of L's last entry (another seed only
  reorders ties; every entry of D with key > b is in L).

Global selections merge the per-tensor answers with select's tie rule; random ones need only
the shapes and E (their values are NaN: not kept). Anything else (k above the cap, another seed
reaching into a tie at b, E outside D) recomputes the whole scores once (``recompute``) and
selects from them: a selection is always the one the whole tensors give.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from esa.errors import ConfigError
from esa.metrics.registry import score_summary
from esa.select import Selection, _check, _eligible_counts, _key, _mask, _topk_mask, select
from esa.util.sampling import priority, sample_segments

log = logging.getLogger("esa")
LISTS = {
    "top": ("top", False),
    "bottom": ("bottom", False),
    "top_nz": ("top", True),
    "bottom_nz": ("bottom", True),
}
SAMPLE_MAX = 1 << 18  # histogram sample: at most this many scores ...
SAMPLE_SHARE = 32  # ... and at most 1/32 of them
Entry = tuple[torch.Tensor, torch.Tensor, bool]  # ascending flat indices, their scores, L == D


def candidate_cap(k: int) -> int:
    """Candidates kept per tensor, list and kind for selections of up to ``k`` entries: C = 2k
    (the slack keeps k eligible ones when a control excludes a few, e.g. weights on a grid)."""
    return 2 * max(1, int(k))


@dataclass(eq=False)
class CandidateScores:
    """Per-tensor candidate lists of one score set (see the module doc); iterates over the
    scored tensor names like the dict of whole scores does. ``esa.select.select`` accepts it."""

    seed: int
    cap: int
    shapes: dict[str, tuple[int, ...]]
    lists: dict[str, dict[str, Entry]]  # list name (LISTS) -> tensor -> entry
    dense: dict[str, torch.Tensor]  # tensor -> every score (flat), where that is smaller
    nonzero: dict[str, int]  # w ≠ 0 entries of each tensor when scored
    summary: dict
    sample: torch.Tensor  # a uniform sample of all scores (float32, CPU), for the histogram
    params: Mapping[str, torch.Tensor] | None = None  # the weights, to check E ⊆ {w ≠ 0}
    recompute: Callable[[], dict] | None = None  # the whole scores, when candidates cannot answer
    _full: dict | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def placeholders(self) -> dict[str, torch.Tensor]:
        """name -> a NaN tensor of the score's shape (a stride-0 view: no memory) on the weight's
        device, where eligible masks live (no copies to the CPU)."""
        params = self.params or {}
        return {
            n: torch.full((), math.nan, device=params[n].device if n in params else "cpu").expand(s)
            for n, s in self.shapes.items()
        }

    def full_scores(self) -> dict[str, torch.Tensor]:
        """The whole scores (recomputed once, then kept); ConfigError without ``recompute``."""
        if self._full is None:
            if self.recompute is None:
                raise ConfigError("cached candidates cannot answer this selection; recompute the scores")
            log.info("esa: candidates do not decide this selection; recomputing the whole scores")
            self._full = self.recompute()
        return self._full

    def select_entries(
        self,
        k: int,
        kind: str = "top",
        mode: str = "per_layer",
        seed: int = 0,
        metric: str = "",
        eligible=None,
    ) -> Selection:
        """``esa.select.select`` on these candidates: the same Selection as from the whole scores
        (random: the same entries, values NaN)."""
        holders = self.placeholders()
        if kind == "random":
            return select(holders, k, kind, mode, seed, metric, eligible)
        k = _check(holders, k, kind, mode)
        counts = _eligible_counts(holders, eligible, k, mode)
        picks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.shapes:
            want = k if mode == "per_layer" else min(k, counts[name])
            got = self._answer(name, kind, want, int(seed), _mask(eligible, name, holders[name]))
            if got is None:
                return select(self.full_scores(), k, kind, mode, seed, metric, eligible)
            picks[name] = got
        if mode == "global":
            picks = _merge(picks, k, kind, int(seed))
        excluded = sum(math.prod(s) - counts[n] for n, s in self.shapes.items())
        return Selection(
            kind,
            mode,
            k,
            int(seed),
            metric,
            {n: i for n, (i, _) in picks.items()},
            {n: v.to(torch.float32) for n, (_, v) in picks.items()},
            dict(self.shapes),
            excluded,
        )

    def _answer(self, name: str, kind: str, want: int, seed: int, mask) -> tuple | None:
        """(indices, scores) of the first ``want`` eligible entries under ≺_seed, or None when
        the candidates cannot prove them."""
        if want == 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        for entry in self._options(name, kind, mask):
            idx, vals, complete = entry
            if mask is not None:
                keep = mask[idx.to(mask.device)].cpu()
                idx, vals = idx[keep], vals[keep]
            key = _key(vals, kind)
            if not complete:
                proven = idx.numel() if seed == self.seed else int((key > _key(entry[1], kind).min()).sum())
                if proven < want:
                    continue
            chosen = _topk_mask(key, want, priority(idx, seed, name).__getitem__).nonzero().flatten()
            return idx[chosen], vals[chosen]
        return None

    def _options(self, name: str, kind: str, mask) -> list[Entry]:
        """The lists whose domain holds E: the w ≠ 0 one first where E ⊆ {w ≠ 0}, then all."""
        if name in self.dense:
            values = self.dense[name]
            return [(torch.arange(values.numel()), values, True)]
        out = [self.lists[kind][name]]
        nz = self.lists[f"{kind}_nz"].get(name)
        if nz is not None and mask is not None and self._within_nonzero(name, mask):
            out.insert(0, nz)
        return out

    def _within_nonzero(self, name: str, mask: torch.Tensor) -> bool:
        w = None if self.params is None else self.params.get(name)
        if w is None:
            return False
        zero = (w.detach().reshape(-1) == 0).to(mask.device)
        return int((~zero).sum()) == self.nonzero[name] and not bool((mask & zero).any())


def build_candidates(
    scores: Mapping[str, torch.Tensor], cap: int, seed: int, params: Mapping[str, torch.Tensor] | None = None
) -> CandidateScores:
    """Candidates of ``scores`` (lists of ``cap`` entries, see the module doc) under ``seed``;
    ``params`` (the weights) add the w ≠ 0 lists of tensors with zero weights."""
    lists: dict[str, dict[str, Entry]] = {n: {} for n in LISTS}
    dense, nonzero = {}, {}
    for name, score in scores.items():
        w = None if params is None else params.get(name)
        nz = None if w is None else (w.detach() != 0).reshape(score.shape)
        nonzero[name] = score.numel() if nz is None else int(nz.sum())
        domains = [False] + ([True] if nonzero[name] < score.numel() else [])
        list_bytes = sum(min(cap, nonzero[name] if d else score.numel()) for d in domains) * 2 * 12
        if list_bytes >= score.numel() * score.element_size():
            dense[name] = score.detach().reshape(-1).cpu()
            continue
        for list_name, (kind, on_nonzero) in LISTS.items():
            if on_nonzero in domains:
                lists[list_name][name] = _prefix(score, name, kind, cap, seed, nz if on_nonzero else None)
    return CandidateScores(
        int(seed),
        int(cap),
        {n: tuple(int(d) for d in s.shape) for n, s in scores.items()},
        lists,
        dense,
        nonzero,
        score_summary(dict(scores)),
        plot_sample(scores, seed),
    )


def _prefix(score: torch.Tensor, name: str, kind: str, cap: int, seed: int, domain) -> Entry:
    """The first min(cap, |D|) entries of D (``domain`` mask, None: all) under ≺_seed."""
    size = score.numel() if domain is None else int(domain.sum())
    take = min(cap, size)
    if take == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=score.dtype), True
    allowed = None if domain is None else {name: domain}
    idx = select({name: score}, take, kind, seed=seed, eligible=allowed).indices[name]
    return idx, score.detach().reshape(-1)[idx.to(score.device)].cpu(), take == size


def _merge(picks: dict, k: int, kind: str, seed: int) -> dict:
    """The k first of the per-tensor answers under select's global order (key, priority, tensor,
    index): what its streaming merge keeps."""
    names = list(picks)
    key = torch.cat([_key(picks[n][1], kind).to(torch.float64) for n in names])
    prio = torch.cat([priority(picks[n][0], seed, n) for n in names])
    which = torch.cat([torch.full((picks[n][0].numel(),), i, dtype=torch.long) for i, n in enumerate(names)])
    keep = _topk_mask(key, k, prio.__getitem__)
    return {n: (picks[n][0][keep[which == i]], picks[n][1][keep[which == i]]) for i, n in enumerate(names)}


def plot_sample(scores: Mapping[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """A uniform sample without replacement of min(SAMPLE_MAX, entries / SAMPLE_SHARE) scores
    (at least one), float32 on the CPU: what the score histogram is drawn from."""
    parts = [s.detach().reshape(-1) for s in scores.values()]
    total = sum(p.numel() for p in parts)
    if total == 0:
        return torch.empty(0)
    gen = torch.Generator().manual_seed(int(seed))
    which, flat = sample_segments(
        [p.numel() for p in parts], min(SAMPLE_MAX, max(1, total // SAMPLE_SHARE)), gen
    )
    return torch.cat([p[flat[which == i].to(p.device)].float().cpu() for i, p in enumerate(parts)])


def summary_of(scores) -> dict:
    """``score_summary`` of whole scores, or the one candidates keep (computed on the whole)."""
    return scores.summary if isinstance(scores, CandidateScores) else score_summary(dict(scores))


def histogram_values(scores):
    """What the score histogram is drawn from: the candidates' sample, or the whole scores (CPU)."""
    return (
        scores.sample if isinstance(scores, CandidateScores) else {n: v.to("cpu") for n, v in scores.items()}
    )
