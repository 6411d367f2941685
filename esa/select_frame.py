"""Selection tables: where each selected entry sits (layer, component, row, col) and the
order of a `esa.select.Selection` frame; the helpers behind ``to_frame`` and ``from_frame``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from esa.errors import ConfigError


def rank_keys(kind: str, score: np.ndarray) -> np.ndarray:
    """Ascending sort key: most extreme first; NaN last; random keeps (tensor, index) order."""
    if kind == "random":
        return np.zeros_like(score)
    key = -score if kind == "top" else score.copy()
    key[np.isnan(key)] = np.inf
    return key


def locations(names, tensor_pos, flat, shapes, param_map) -> dict[str, list]:
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
                out["row"][j], out["col"][j] = row_col(shapes.get(name), f)
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


def row_col(shape, flat: int) -> tuple[int | None, int | None]:
    if shape is None:
        return None, None
    if len(shape) >= 2:
        return divmod(flat, shape[-1])
    return flat, 0


def frame_flat_indices(df: pd.DataFrame, shapes) -> list[int]:
    if "flat_index" in df.columns:
        return [int(v) for v in df["flat_index"]]
    flats = []
    for name, row, col in zip(df["tensor"].astype(str), df["row"], df["col"]):
        shape = shapes.get(name)
        if shape is None or len(shape) > 2:
            raise ConfigError(f"no flat_index column and no 1-D/2-D shape for {name!r}; pass shapes=")
        flats.append(int(row) * shape[-1] + int(col) if len(shape) == 2 else int(row))
    return flats
