"""Top-k / bottom-k / random-k selection of weight entries from sensitivity scores.

NaN scores are ordered deterministically: as ``-inf`` for ``top`` and as ``+inf`` for ``bottom``
(i.e. NaN entries are chosen last). Ties are broken by tensor order (the order of the ``scores``
dict) and then by ascending flat index, so a selection is a pure function of its inputs.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from esa.errors import ConfigError

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
        union = len(a | b)
        return 1.0 if union == 0 else len(a & b) / union

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
        order = np.lexsort((flat, tensor_pos, _rank_keys(self.kind, score)))
        tensor_pos, flat, score = tensor_pos[order], flat[order], score[order]
        columns = {"tensor": [names[i] for i in tensor_pos], "flat_index": flat}
        columns.update(_locations(names, tensor_pos, flat, self.shapes, param_map))
        columns["score"] = score
        columns["rank"] = np.arange(1, len(flat) + 1, dtype=np.int64)
        frame = pd.DataFrame(columns, columns=COLUMNS)
        frame.attrs.update(self._meta())
        return frame

    def to_csv(self, path, param_map=None) -> None:
        """Write ``to_frame`` atomically (temp file + ``os.replace``)."""
        frame = self.to_frame(param_map)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csv", dir=directory)
        try:
            with os.fdopen(fd, "w", newline="") as handle:
                frame.to_csv(handle, index=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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
        flats = _frame_flat_indices(df, shapes)
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
) -> Selection:
    """Select ``k`` entries per tensor (``per_layer``) or over all tensors (``global``).

    ``top`` takes the largest scores, ``bottom`` the smallest, ``random`` a uniform sample without
    replacement (seeded; the scores are only recorded). Global selection streams over the tensors
    (per-tensor top-k, then a running merge); it never concatenates all scores.
    """
    k = _check(scores, k, kind, mode)
    shapes = {name: tuple(int(d) for d in s.shape) for name, s in scores.items()}
    if kind == "random":
        picks = _random_per_layer(scores, k, seed) if mode == "per_layer" else _random_global(scores, k, seed)
    elif mode == "per_layer":
        picks = {name: _tensor_topk(s, k, kind) for name, s in scores.items()}
    else:
        picks = _global_extreme(scores, k, kind)
    indices, values = {}, {}
    for name, s in scores.items():
        idx = picks.get(name)
        if idx is None:
            idx = torch.empty(0, dtype=torch.long)
        idx = torch.sort(idx.to("cpu", torch.long)).values
        indices[name] = idx
        flat = s.detach().reshape(-1)
        values[name] = flat[idx.to(flat.device)].to("cpu", torch.float32)
    return Selection(kind, mode, k, int(seed), metric, indices, values, shapes)


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


def _key(score: torch.Tensor, kind: str) -> torch.Tensor:
    """Flat float key where larger = more extreme; NaN becomes -inf (chosen last)."""
    flat = score.detach().reshape(-1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    key = flat if kind == "top" else -flat
    return torch.nan_to_num(key, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _topk_indices(key: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest keys, ties broken by lower position; ascending order."""
    return _topk_mask(key, k).nonzero().flatten()


def _topk_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, key.numel())
    if k == 0:
        return torch.zeros_like(key, dtype=torch.bool)
    threshold = torch.topk(key, k, sorted=False).values.min()
    mask = key > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = (key == threshold).nonzero().flatten()[:need]
        mask[ties] = True
    return mask


def _tensor_topk(score: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """Ascending positions of the k most extreme entries of one tensor (ties: lower position),
    in chunks of ``_CHUNK`` entries so the temporary keys stay small whatever the tensor size."""
    flat = score.detach().reshape(-1)
    if flat.numel() <= _CHUNK:
        return _topk_indices(_key(flat, kind), k)
    cand_idx, cand_key = [], []
    for start in range(0, flat.numel(), _CHUNK):
        key = _key(flat[start : start + _CHUNK], kind)
        idx = _topk_indices(key, k)
        cand_idx.append(idx + start)
        cand_key.append(key[idx])
    idx, key = torch.cat(cand_idx), torch.cat(cand_key)  # ascending positions
    return idx[_topk_indices(key, k)]


def _global_extreme(scores, k: int, kind: str) -> dict[str, torch.Tensor]:
    """Streaming global top-k: per-tensor top-k (on the scores' device), then a running best-k of
    (key, tensor, index) on the CPU. Extra memory: one chunk of keys plus O(k) candidates."""
    names = list(scores)
    run_key = torch.empty(0, dtype=torch.float64)
    run_tensor = torch.empty(0, dtype=torch.long)
    run_index = torch.empty(0, dtype=torch.long)
    for pos, name in enumerate(names):
        idx = _tensor_topk(scores[name], k, kind)
        cand_key = _key(scores[name].detach().reshape(-1)[idx], kind).to("cpu", torch.float64)
        idx = idx.cpu()
        run_key = torch.cat([run_key, cand_key])
        run_tensor = torch.cat([run_tensor, torch.full_like(idx, pos)])
        run_index = torch.cat([run_index, idx])
        keep = _topk_mask(run_key, k)
        run_key, run_tensor, run_index = run_key[keep], run_tensor[keep], run_index[keep]
    return {name: run_index[run_tensor == pos] for pos, name in enumerate(names)}


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _sample_unique(total: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers uniform in [0, total): first k distinct of iid draws (or randperm)."""
    if 2 * k >= total:
        return torch.randperm(total, generator=gen)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(0, total, (k - chosen.numel(),), generator=gen)
        fresh = torch.unique(draw)
        chosen = torch.cat([chosen, fresh[~torch.isin(fresh, chosen)]])
    return chosen


def _random_per_layer(scores, k: int, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in scores.items():
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
        out[name] = _sample_unique(int(s.numel()), k, gen)
    return out


def _random_global(scores, k: int, seed: int) -> dict[str, torch.Tensor]:
    names = list(scores)
    numels = torch.tensor([int(scores[n].numel()) for n in names], dtype=torch.long)
    ends = torch.cumsum(numels, 0)
    starts = ends - numels
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    pos = _sample_unique(int(ends[-1]), k, gen)
    which = torch.searchsorted(ends, pos, right=True)
    flat = pos - starts[which]
    return {name: flat[which == i] for i, name in enumerate(names)}


def _rank_keys(kind: str, score: np.ndarray) -> np.ndarray:
    """Ascending sort key: most extreme first; NaN last; random keeps (tensor, index) order."""
    if kind == "random":
        return np.zeros_like(score)
    key = -score if kind == "top" else score.copy()
    key[np.isnan(key)] = np.inf
    return key


def _locations(names, tensor_pos, flat, shapes, param_map) -> dict[str, list]:
    n = len(flat)
    if param_map is not None:
        out: dict[str, list] = {c: [None] * n for c in ("layer", "component", "expert", "row", "col")}
        for j, (pos, f) in enumerate(zip(tensor_pos.tolist(), flat.tolist())):
            name = names[pos]
            if name in param_map:
                info = param_map[name]
                comp, expert, row, col = info.locate(f)
                out["layer"][j], out["component"][j], out["expert"][j] = info.layer, comp, expert
                out["row"][j], out["col"][j] = row, col
            else:
                out["row"][j], out["col"][j] = _row_col(shapes.get(name), f)
        return out
    rows: list[int | None] = [None] * n
    cols: list[int | None] = [None] * n
    for pos, name in enumerate(names):
        shape = shapes.get(name)
        where = np.nonzero(tensor_pos == pos)[0]
        if shape is None or where.size == 0:
            continue
        width = shape[-1] if len(shape) >= 2 else 0
        for j, f in zip(where.tolist(), flat[where].tolist()):
            rows[j], cols[j] = divmod(f, width) if width else (f, 0)
    return {"layer": [None] * n, "component": [None] * n, "expert": [None] * n, "row": rows, "col": cols}


def _row_col(shape, flat: int) -> tuple[int | None, int | None]:
    if shape is None:
        return None, None
    if len(shape) >= 2:
        return divmod(flat, shape[-1])
    return flat, 0


def _frame_flat_indices(df: pd.DataFrame, shapes) -> list[int]:
    if "flat_index" in df.columns:
        return [int(v) for v in df["flat_index"]]
    flats = []
    for name, row, col in zip(df["tensor"].astype(str), df["row"], df["col"]):
        shape = shapes.get(name)
        if shape is None or len(shape) > 2:
            raise ConfigError(f"no flat_index column and no 1-D/2-D shape for {name!r}; pass shapes=")
        flats.append(int(row) * shape[-1] + int(col) if len(shape) == 2 else int(row))
    return flats
