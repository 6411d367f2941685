"""Top-k / bottom-k / random-k selection of weight entries from sensitivity scores.

NaN scores are ordered as ``-inf`` for ``top`` and as ``+inf`` for ``bottom`` (chosen last).
Ties (equal keys) are broken by a pseudo-random priority of (seed, tensor name, flat index)
(``esa.util.sampling.priority``): the same seed always picks the same tied entries, other seeds
pick others; equal priorities fall back to tensor order, then ascending index. A selection is a
pure function of its inputs. ``eligible`` (name -> bool mask) restricts every kind to the entries
marked True (``esa.perturb.changeable``: the entries a perturbation actually changes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esa.errors import ConfigError
from esa.select_frame import frame_flat_indices, locations, rank_keys
from esa.util.files import atomic_write
from esa.util.sampling import priority, sample_segments, tensor_seed

KINDS = ("top", "bottom", "random")
MODES = ("per_layer", "global")
_CHUNK = 1 << 24  # entries per chunk of temporary top-k keys
COLUMNS = ["tensor", "flat_index", "layer", "component", "expert", "row", "col", "score", "rank"]


@dataclass(frozen=True, eq=False)
class Selection:
    """A set of ``(tensor, flat_index)`` entries with the scores they were chosen by."""

    kind: str
    mode: str
    k: int
    seed: int
    metric: str
    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    excluded: int = 0  # entries of the scored tensors that ``eligible`` ruled out

    @property
    def size(self) -> int:
        """Total number of selected entries."""
        return int(sum(int(i.numel()) for i in self.indices.values()))

    def keys(self) -> set[tuple[str, int]]:
        """The selected entries as a set of ``(name, flat_index)`` pairs."""
        return {(name, int(i)) for name, idx in self.indices.items() for i in idx.tolist()}

    def jaccard(self, other: Selection) -> float:
        """|A∩B| / |A∪B| (1.0 when both are empty)."""
        a, b = self.keys(), other.keys()
        return len(a & b) / len(a | b) if a | b else 1.0

    def overlap(self, other: Selection) -> float:
        """|A∩B| / min(|A|, |B|) (1.0 when both are empty, 0.0 when only one is)."""
        a, b = self.keys(), other.keys()
        if not a and not b:
            return 1.0
        small = min(len(a), len(b))
        return 0.0 if small == 0 else len(a & b) / small

    def by_tensor_counts(self) -> dict[str, int]:
        """Number of selected entries per tensor (tensors with none are left out)."""
        return {n: int(i.numel()) for n, i in self.indices.items() if i.numel() > 0}

    def to_frame(self, param_map=None) -> pd.DataFrame:
        """One row per entry, sorted by rank (1 = most extreme; for random: tensor order, index).

        Columns: tensor, flat_index, layer, component, expert, row, col, score, rank. With a
        ``param_map`` the location comes from ``param_map[name].locate``; otherwise layer,
        component and expert are None and row/col come from the stored shape.
        """
        names = list(self.indices)
        tensor_pos = np.concatenate(
            [np.full(self.indices[n].numel(), i, dtype=np.int64) for i, n in enumerate(names)]
            or [np.empty(0, dtype=np.int64)]
        )
        flat = np.concatenate([self.indices[n].numpy() for n in names] or [np.empty(0, np.int64)])
        score = np.concatenate([self.values[n].numpy().astype(np.float64) for n in names] or [np.empty(0)])
        order = np.lexsort((flat, tensor_pos, rank_keys(self.kind, score)))
        tensor_pos, flat, score = tensor_pos[order], flat[order], score[order]
        columns = {"tensor": [names[i] for i in tensor_pos], "flat_index": flat}
        columns.update(locations(names, tensor_pos, flat, self.shapes, param_map))
        columns["score"] = score
        columns["rank"] = np.arange(1, len(flat) + 1, dtype=np.int64)
        frame = pd.DataFrame(columns, columns=COLUMNS)
        frame.attrs.update(self._meta())
        return frame

    def to_csv(self, path, param_map=None) -> None:
        """Write ``to_frame`` atomically (temp file + ``os.replace``)."""
        atomic_write(Path(path), self.to_frame(param_map).to_csv(index=False))

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        *,
        kind: str | None = None,
        mode: str | None = None,
        k: int | None = None,
        seed: int | None = None,
        metric: str | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> Selection:
        """Rebuild a Selection from ``to_frame`` output (or its CSV read back with pandas).

        Metadata not given as arguments comes from ``df.attrs`` (set by ``to_frame``), else
        defaults (kind "top", mode "per_layer", k inferred from the counts).
        """
        attrs = dict(df.attrs)
        shapes = dict(shapes if shapes is not None else attrs.get("shapes", {}))
        shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        if "tensor" not in df.columns or "score" not in df.columns:
            raise ConfigError("frame needs 'tensor' and 'score' columns; pass Selection.to_frame output")
        flats = frame_flat_indices(df, shapes)
        groups: dict[str, list[tuple[int, float]]] = {}
        for name, flat, score in zip(df["tensor"].astype(str), flats, df["score"].astype(float)):
            groups.setdefault(name, []).append((flat, score))
        indices, values = {}, {}
        for name, pairs in groups.items():
            pairs.sort()
            indices[name] = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            values[name] = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
        mode = mode or attrs.get("mode", "per_layer")
        if k is None:
            k = attrs.get("k")
        if k is None:
            counts = [len(p) for p in groups.values()]
            k = (max(counts) if mode == "per_layer" else sum(counts)) if counts else 0
        return cls(
            kind=kind or attrs.get("kind", "top"),
            mode=mode,
            k=int(k),
            seed=int(seed if seed is not None else attrs.get("seed", 0)),
            metric=metric if metric is not None else attrs.get("metric", ""),
            indices=indices,
            values=values,
            shapes=shapes,
        )

    def _meta(self) -> dict:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "k": self.k,
            "seed": self.seed,
            "metric": self.metric,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
        }


def select(
    scores: Mapping[str, torch.Tensor],
    k: int,
    kind: str = "top",
    mode: str = "per_layer",
    seed: int = 0,
    metric: str = "",
    eligible: Mapping[str, torch.Tensor] | None = None,
) -> Selection:
    """Select ``k`` entries per tensor (``per_layer``) or over all tensors (``global``).

    ``top`` takes the largest scores, ``bottom`` the smallest (ties broken with ``seed``),
    ``random`` a uniform sample without replacement (seeded; the scores are only recorded).
    ``eligible`` maps a tensor name to a bool mask of its shape: entries marked False are never
    selected (a name left out is all eligible); ConfigError when fewer than k are eligible.
    Global selection streams over the tensors (per-tensor top-k, then a running merge); it never
    concatenates all scores. Cached candidates (``esa.metrics.candidates``) answer themselves.
    """
    if hasattr(scores, "select_entries"):
        return scores.select_entries(k, kind, mode, seed, metric, eligible)
    k = _check(scores, k, kind, mode)
    counts = _eligible_counts(scores, eligible, k, mode)
    if kind == "random":
        sampler = _random_per_layer if mode == "per_layer" else _random_global
        picks = sampler(scores, k, seed, eligible)
    elif mode == "per_layer":
        picks = {n: _tensor_topk(s, k, kind, seed, n, _mask(eligible, n, s)) for n, s in scores.items()}
    else:
        picks = _global_extreme(scores, k, kind, seed, eligible)
    indices, values = {}, {}
    for name, s in scores.items():
        idx = picks.get(name, torch.empty(0, dtype=torch.long))
        indices[name] = idx = torch.sort(idx.to("cpu", torch.long)).values
        flat = s.detach().reshape(-1)
        values[name] = flat[idx.to(flat.device)].to("cpu", torch.float32)
    shapes = {name: tuple(int(d) for d in s.shape) for name, s in scores.items()}
    excluded = sum(int(s.numel()) - counts[n] for n, s in scores.items())
    return Selection(kind, mode, k, int(seed), metric, indices, values, shapes, excluded)


def _check(scores, k, kind, mode) -> int:
    if kind not in KINDS:
        raise ConfigError(f"unknown selection kind {kind!r}; use one of {', '.join(KINDS)}")
    if mode not in MODES:
        raise ConfigError(f"unknown selection mode {mode!r}; use one of {', '.join(MODES)}")
    if not scores:
        raise ConfigError("no scores to select from; compute scores for at least one tensor first")
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise ConfigError(f"k must be an integer, got {k!r}; pass e.g. k=100")
    k = int(k)
    if k <= 0:
        raise ConfigError(f"k must be positive, got {k}; pass k >= 1")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise ConfigError(f"score for {name!r} is not a tensor; pass dict name -> torch.Tensor")
    if mode == "per_layer":
        for name, s in scores.items():
            if k > s.numel():
                raise ConfigError(
                    f"k={k} exceeds the {s.numel()} entries of {name!r}; lower k or use mode='global'"
                )
    else:
        total = sum(int(s.numel()) for s in scores.values())
        if k > total:
            raise ConfigError(f"k={k} exceeds the {total} scored entries; lower k to at most {total}")
    return k


def _eligible_counts(scores, eligible, k: int, mode: str) -> dict[str, int]:
    """Eligible entries per tensor (ConfigError when fewer than k can be selected)."""
    counts = {name: int(s.numel()) for name, s in scores.items()}
    if eligible is not None and not isinstance(eligible, Mapping):
        raise ConfigError("eligible must map tensor names to bool masks; pass e.g. changeable(...)")
    for name, s in scores.items():
        mask = _mask(eligible, name, s)
        counts[name] = counts[name] if mask is None else int(mask.sum())
        if mode == "per_layer" and counts[name] < k:
            raise ConfigError(
                f"only {counts[name]} of the {s.numel()} entries of {name!r} are eligible; "
                f"lower k to at most {counts[name]} or use mode='global'"
            )
    if mode == "global" and sum(counts.values()) < k:
        raise ConfigError(f"only {sum(counts.values())} scored entries are eligible; lower k to at most that")
    return counts


def _mask(eligible, name: str, score: torch.Tensor, device=None) -> torch.Tensor | None:
    """The flat eligibility mask of ``name`` on the score's device (None: all eligible); masks
    are fetched per use, so a lazy mapping (``changeable``) holds one tensor's mask at a time."""
    mask = None if eligible is None else eligible.get(name)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.numel() != score.numel():
        raise ConfigError(f"eligible[{name!r}] must be a bool tensor of shape {tuple(score.shape)}")
    return mask.detach().reshape(-1).to(device or score.device)


def _key(score: torch.Tensor, kind: str) -> torch.Tensor:
    """Flat float key where larger = more extreme; NaN becomes -inf (chosen last)."""
    flat = score.detach().reshape(-1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    key = flat if kind == "top" else -flat
    return torch.nan_to_num(key, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _topk_mask(key: torch.Tensor, k: int, prio: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mask of the k largest keys; ties at the k-th key go to the highest ``prio(positions)``,
    then to the lower position."""
    k = min(k, key.numel())
    if k == 0:
        return torch.zeros_like(key, dtype=torch.bool)
    threshold = torch.topk(key, k, sorted=False).values.min()
    mask = key > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = (key == threshold).nonzero().flatten()
        if ties.numel() > need:  # priority first, then the lower position (positions < 2**32)
            order = prio(ties).to(ties.device) * 2**32 + (2**32 - 1 - ties)
            ties = ties[torch.topk(order, need, sorted=False).indices]
        mask[ties] = True
    return mask


def _tensor_topk(
    score: torch.Tensor, k: int, kind: str, seed: int = 0, name: str = "", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Ascending positions of the k most extreme (eligible) entries of one tensor, ties by
    ``priority(seed, name)``, in chunks of ``_CHUNK`` entries so the temporary keys stay small."""
    flat = score.detach().reshape(-1)
    cands = []
    for start in range(0, max(flat.numel(), 1), _CHUNK):  # one (empty) chunk at least
        allowed = None if mask is None else mask[start : start + _CHUNK]
        cands.append(_chunk_topk(_key(flat[start : start + _CHUNK], kind), k, seed, name, start, allowed))
    if len(cands) == 1:
        return cands[0][0]
    idx, key = torch.cat([c[0] for c in cands]), torch.cat([c[1] for c in cands])  # ascending
    return idx[_topk_mask(key, k, lambda i: priority(idx[i], seed, name)).nonzero().flatten()]


def _chunk_topk(key, k: int, seed: int, name: str, start: int, allowed) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions, keys) of the k largest keys of a chunk at ``start`` (only where the bool
    mask ``allowed`` is True). Excluded entries are first set to −inf in place of a gather; where
    the k chosen then all lie above −inf, no excluded entry can be among them or their ties, so
    the answer is the gather's (else it gathers)."""
    pos = None
    if allowed is not None:
        take = min(k, int(allowed.sum()))
        filled = torch.where(allowed, key, float("-inf"))
        local = _topk_mask(filled, take, lambda i: priority(i + start, seed, name)).nonzero().flatten()
        if take == 0 or bool(filled[local].min() > float("-inf")):
            return local + start, key[local]
        pos = allowed.nonzero().flatten()
        key = key[pos]

    def at(i: torch.Tensor) -> torch.Tensor:
        return (i if pos is None else pos[i]) + start

    local = _topk_mask(key, k, lambda i: priority(at(i), seed, name)).nonzero().flatten()
    return at(local), key[local]


def _global_extreme(scores, k: int, kind: str, seed: int, eligible) -> dict[str, torch.Tensor]:
    """Streaming global top-k: per-tensor top-k (on the scores' device), then a running best-k of
    (key, priority, tensor, index) on the CPU. Extra memory: one chunk of keys plus O(k) candidates."""
    names = list(scores)
    run_key, run_prio = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    run_tensor, run_index = run_prio.clone(), run_prio.clone()
    for pos, name in enumerate(names):
        idx = _tensor_topk(scores[name], k, kind, seed, name, _mask(eligible, name, scores[name]))
        cand_key = _key(scores[name].detach().reshape(-1)[idx], kind).to("cpu", torch.float64)
        idx = idx.cpu()
        run_key = torch.cat([run_key, cand_key])
        run_prio = torch.cat([run_prio, priority(idx, seed, name)])
        run_tensor = torch.cat([run_tensor, torch.full_like(idx, pos)])
        run_index = torch.cat([run_index, idx])
        keep = _topk_mask(run_key, k, run_prio.__getitem__)
        run_key, run_prio = run_key[keep], run_prio[keep]
        run_tensor, run_index = run_tensor[keep], run_index[keep]
    return {name: run_index[run_tensor == pos] for pos, name in enumerate(names)}


def _random_per_layer(scores, k: int, seed: int, eligible) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in scores.items():
        gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        out[name] = sample_segments([int(s.numel())], k, gen, [_mask(eligible, name, s, "cpu")])[1]
    return out


def _random_global(scores, k: int, seed: int, eligible) -> dict[str, torch.Tensor]:
    """Uniform over all (eligible) entries; the eligible masks are held on the CPU meanwhile."""
    names = list(scores)
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    masks = [_mask(eligible, n, scores[n], "cpu") for n in names]
    which, flat = sample_segments([int(scores[n].numel()) for n in names], k, gen, masks)
    return {name: flat[which == i] for i, name in enumerate(names)}
