"""What the super-weight detector reports: per-layer activation maxima, candidate super weights
and the report holding both, plus the candidates as a ``Selection`` (for ``esa.perturb.perturbed``).

A candidate addresses ``param.reshape(-1)[flat_index]``: for a dense down projection
``flat = row * in + col``; for fused experts ``[E, out, in]`` ``flat = (e * out + row) * in + col``
(transposed ``[E, in, out]``: ``(e * in + col) * out + row``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from esa.select import Selection


@dataclass
class LayerActivation:
    """Largest |input| and |output| of one layer's down projection(s) over all prompt tokens
    (``*_token``: position in the flattened ``input_ids``; ``expert``: the expert holding the
    output maximum, for MoE layers)."""

    layer: int
    module: str
    max_abs_input: float
    input_channel: int
    input_token: int
    max_abs_output: float
    output_channel: int
    output_token: int
    expert: int | None = None
    spike: bool = False


@dataclass
class SuperWeight:
    """A candidate super weight. ``row``/``col`` are the output/input channel of the down
    projection; ``flat_index`` addresses ``param.reshape(-1)`` (authoritative for any layout)."""

    layer: int
    param_name: str
    module: str
    row: int
    col: int
    expert: int | None
    flat_index: int
    weight: float
    input_activation: float
    output_activation: float
    token: int
    token_text: str | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


@dataclass
class SuperWeightReport:
    """What ``detect_super_weights`` saw: per-layer maxima, the spike rule and the candidates."""

    prompt: str | None
    n_tokens: int
    threshold: float
    ratio: float
    median_max_input: float
    median_max_output: float
    layers: list[LayerActivation]
    candidates: list[SuperWeight]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def spike_layers(self) -> list[int]:
        return [la.layer for la in self.layers if la.spike]

    @property
    def coordinates(self) -> dict[str, torch.Tensor]:
        """name -> sorted LongTensor of flat indices of the candidates (for ``perturbed``)."""
        out: dict[str, list[int]] = {}
        for c in self.candidates:
            out.setdefault(c.param_name, []).append(c.flat_index)
        return {n: torch.tensor(sorted(set(v)), dtype=torch.long) for n, v in out.items()}

    def selection(self) -> Selection:
        """The candidates as a real ``Selection`` (metric "super_weight", score = |output act|)."""
        return candidate_selection(self.candidates, self.shapes)

    def to_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("prompt", "n_tokens", "threshold", "ratio", "median_max_input", "median_max_output")
        }
        out["spike_layers"] = self.spike_layers
        out["layers"] = [asdict(la) for la in self.layers]
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out


def selection_of(
    candidates: Sequence[SuperWeight], shapes: dict, metric: str, scores: dict[tuple[str, int], float]
) -> Selection:
    """The candidates' entries as a Selection named ``metric``: per tensor the sorted distinct flat
    indices, valued ``scores[(name, flat)]`` (0 where absent)."""
    indices: dict[str, list[int]] = {}
    for c in candidates:
        indices.setdefault(c.param_name, [])
        if c.flat_index not in indices[c.param_name]:
            indices[c.param_name].append(c.flat_index)
    idx = {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in indices.items()}
    vals = {
        n: torch.tensor([scores.get((n, int(i)), 0.0) for i in t], dtype=torch.float32)
        for n, t in idx.items()
    }
    return Selection(
        "top",
        "global",
        sum(t.numel() for t in idx.values()),
        0,
        metric,
        idx,
        vals,
        {n: tuple(shapes[n]) for n in idx if n in shapes},
    )


def candidate_selection(candidates: Sequence[SuperWeight], shapes: dict) -> Selection:
    """These candidates (e.g. just the strongest one) as a Selection for ``perturbed``."""
    return selection_of(
        candidates,
        shapes,
        "super_weight",
        {(c.param_name, c.flat_index): abs(c.output_activation) for c in candidates},
    )
