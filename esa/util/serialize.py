"""Plain Python values and strict JSON: what reaches reports, manifests and ``claims.json``.

NaN and inf are kept as floats in memory and written as the strings ``"nan"``, ``"inf"``,
``"-inf"`` (``encode``); ``decode`` restores them under ``"measured"`` keys.

>>> dumps({"ppl": float("inf"), "n": 3})
'{"ppl": "inf", "n": 3}'
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def plain(value: Any) -> Any:
    """Coerce `value` to plain Python (numpy/torch scalars and arrays become float/int/list)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy scalar/array, torch tensor (any device/dtype)
        return plain(value.tolist())
    if hasattr(value, "item"):
        return plain(value.item())
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    return str(value)


def encode(obj: Any) -> Any:
    """JSON-safe copy of `obj`: NaN/inf floats become the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return obj


def jsonable(value: Any) -> Any:
    """``encode(plain(value))``: plain JSON types with NaN/inf as strings."""
    return encode(plain(value))


def _undo(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, Mapping):
        return {k: _undo(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_undo(v) for v in obj]
    return obj


def decode(obj: Any) -> Any:
    """Inverse of `encode` for measured values: "nan"/"inf"/"-inf" under a "measured" key."""
    if isinstance(obj, Mapping):
        return {k: (_undo(v) if k == "measured" else decode(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (no bare NaN) of `obj` after `plain` + `encode`."""
    return json.dumps(jsonable(obj), allow_nan=False, ensure_ascii=False, indent=indent)
