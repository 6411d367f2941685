"""Recorded outcomes: claims already known to be falsified on a model, with the values to compare.

``<rootdir>/experiments/recorded/<model>.json`` (ini ``esa_recorded``) holds a JSON list of entries
``{"claim_id", "verdict": "falsified", "key", "key_value", "threshold", "tolerance": {"rel",
"abs"}, "measured", "tier", "data_sha256", "date", "note"}`` (``tier`` and ``data_sha256`` are
optional: the entry then applies only to runs at that tier and on that data). ``claim_id`` is the
nodeid relative to rootdir. An item matches when its claim id is in the file of its model
parameter (or, for items without one, of any ``--esa-model``) and the setup agrees; the plugin
then marks it ``xfail(strict=True, raises=ClaimFalsified)`` and, after the call, `changed` compares
the threshold (exactly) and the key value (within the tolerance) with the entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esa.claims.report import fmt, key_measure
from esa.errors import ConfigError
from esa.util.files import atomic_write, file_sha256
from esa.util.serialize import decode, dumps, plain

if TYPE_CHECKING:  # pytest and the options only for annotations: esa.cli imports this module
    import pytest

    from esa.claims.options import EsaOptions

MODEL_PARAMS = ("model", "profiled", "arch")  # parameters whose value names the model under test
TOLERANCE = {"rel": 0.1, "abs": 1e-9}  # |now - recorded| <= max(rel * |recorded|, abs)
COMPARED = ("key", "key_value", "threshold")  # fields an entry needs to be compared
_UNSET: Any = object()
RERECORD = "re-record it with `esa record` (or delete the entry)"


def _restore(value: Any) -> Any:
    """NaN/inf written as "nan"/"inf"/"-inf" back to floats (``decode`` does it under "measured")."""
    return decode({"measured": value})["measured"]


Key = tuple[str, str | None]  # (claim_id, tier): one entry per claim and tier (None: any tier)


def load_recorded(path) -> dict[Key, dict]:
    """{(claim_id, tier): entry} from a recorded-outcomes file (a JSON list); {} when it does not
    exist. A claim may be recorded once per tier (an entry without a tier applies to every tier)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        out = {(e["claim_id"], e.get("tier")): decode(e) for e in entries}
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{path}: expected a JSON list of {{claim_id, key, key_value, threshold, measured, tier, "
            f"date, note}} ({e})"
        ) from None
    for entry in out.values():
        entry.update({k: _restore(entry[k]) for k in ("key_value", "threshold") if k in entry})
    return out


def record_outcome(
    recorded_dir,
    model: str,
    claim_id: str,
    measured: dict,
    note: str = "",
    day: str | None = None,
    tier: str | None = None,
    data_sha256: str | None = None,
    *,
    claim: Mapping | None = None,
    key: str | None = None,
    threshold: Any = _UNSET,
    tolerance: Mapping | None = None,
) -> Path:
    """Add (or replace) the recorded falsification of `claim_id` at `tier` in
    ``<recorded_dir>/<model>.json`` (entries of the claim at other tiers stay).

    `claim` is the claim's record in claims.json: its key measurement (``key``, its value) and its
    ``threshold`` are stored so that later runs compare them (`key` / `threshold` override it;
    without either the entry has no ``threshold`` and every later run reports it changed). With
    ``tier`` / ``data_sha256`` the entry applies only to runs at that tier and on that data."""
    path = Path(recorded_dir) / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {k: v for k, v in load_recorded(path).items() if k != (claim_id, tier or None)}
    measured = plain(measured)
    entry: dict[str, Any] = {"claim_id": claim_id, "verdict": "falsified"}
    if claim is not None:
        key = key if key is not None else key_measure(claim)[0]
        threshold = _restore(plain(claim.get("threshold"))) if threshold is _UNSET else threshold
    if key is not None or threshold is not _UNSET:
        value = measured.get(key) if key is not None else None
        entry["key"], entry["key_value"] = key, value.get("value") if isinstance(value, Mapping) else value
        entry["threshold"] = plain(None if threshold is _UNSET else threshold)
        entry["tolerance"] = {**TOLERANCE, **(tolerance or {})}
    entry.update(measured=measured, date=day or datetime.now().date().isoformat(), note=note)
    if tier:
        entry["tier"] = tier
    if data_sha256:
        entry["data_sha256"] = data_sha256
    entries[(claim_id, tier or None)] = entry
    order = sorted(entries.values(), key=lambda e: (e["claim_id"], e.get("tier") or ""))
    atomic_write(path, dumps(order, indent=1) + "\n")
    return path


def within(value: Any, recorded: Any, rel: float = 0.0, abs_: float = 0.0) -> bool:
    """`value` equals `recorded` within ``max(rel * |recorded|, abs_)`` (numbers), element-wise for
    lists and mappings; NaN matches NaN, inf matches the same-signed inf, anything else exactly."""
    if isinstance(recorded, Mapping):
        return (
            isinstance(value, Mapping)
            and set(value) == set(recorded)
            and all(within(value[k], recorded[k], rel, abs_) for k in recorded)
        )
    if isinstance(recorded, list):
        return (
            isinstance(value, list)
            and len(value) == len(recorded)
            and all(within(v, r, rel, abs_) for v, r in zip(value, recorded))
        )
    if isinstance(value, bool) or isinstance(recorded, bool):
        return type(value) is type(recorded) and value == recorded
    if not all(isinstance(x, (int, float)) for x in (value, recorded)):
        return bool(value == recorded)
    a, b = float(value), float(recorded)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(rel * abs(b), abs_)


def changed(entry: Mapping, measured: Mapping, threshold: Any) -> str | None:
    """Why a recorded falsification no longer describes this run (None when it does): an entry
    without the compared fields, a threshold that differs from the recorded one, or a key value
    outside the entry's tolerance (default `TOLERANCE`)."""
    missing = [f for f in COMPARED if f not in entry]
    if missing:
        return f"the recorded entry has no {', '.join(missing)}, so nothing can be compared: {RERECORD}"
    if not within(plain(threshold), entry["threshold"]):
        return (
            f"the threshold changed since it was recorded (recorded {fmt(entry['threshold'])}, now "
            f"{fmt(threshold)}): the recorded entry is invalid; {RERECORD}"
        )
    key = entry["key"]
    if key is None:
        return None
    if key not in measured:
        return f"the recorded key measurement {key!r} was not measured: {RERECORD}"
    now, was = measured[key].get("value"), entry["key_value"]
    tol = {**TOLERANCE, **(entry.get("tolerance") or {})}
    if within(now, was, float(tol["rel"]), float(tol["abs"])):
        return None
    return (
        f"{key} = {fmt(now)}, recorded {fmt(was)} (tolerance rel {fmt(tol['rel'])}, abs "
        f"{fmt(tol['abs'])}): the falsified result changed; if that is intended, {RERECORD}"
    )


def claim_id(item: pytest.Item) -> str:
    """The item's nodeid without the ``@group`` suffix that xdist's --dist loadgroup appends."""
    marker = item.get_closest_marker("xdist_group")
    group = (marker.kwargs.get("name") or (marker.args[0] if marker.args else None)) if marker else None
    suffix = f"@{group}" if group else None
    return item.nodeid[: -len(suffix)] if suffix and item.nodeid.endswith(suffix) else item.nodeid


def item_models(item: pytest.Item, options: EsaOptions) -> tuple[str, ...]:
    """Models whose recorded file may hold this item: its model parameter (``model``, ``profiled``
    or ``arch``), else every --esa-model (session-level claims over several models)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name in MODEL_PARAMS:
        if name in params:
            return (str(params[name]),)
    return options.models


class RecordedOutcomes:
    """The recorded files of one session, read once each, matched against items."""

    def __init__(self, options: EsaOptions):
        self.options = options
        self._files: dict[str, dict[Key, dict]] = {}
        self._data_sha256: list[str | None] = []  # computed on first need

    def entries(self, model: str) -> dict[Key, dict]:
        """{(claim_id, tier): entry} of ``<recorded_dir>/<model>.json`` (ConfigError when malformed)."""
        if model not in self._files:
            self._files[model] = load_recorded(self.options.recorded_dir / f"{model}.json")
        return self._files[model]

    def same_setup(self, entry: dict) -> bool:
        """A recorded outcome applies only at the tier and on the data it was measured with."""
        if entry.get("tier", self.options.tier.name) != self.options.tier.name:
            return False
        if "data_sha256" not in entry:
            return True
        if not self._data_sha256:
            data = self.options.data
            self._data_sha256.append(file_sha256(data) if data else None)
        return entry["data_sha256"] == self._data_sha256[0]

    def match(self, item: pytest.Item) -> dict | None:
        """``{"model": model, **entry}`` of the first of the item's models that recorded it."""
        for model in item_models(item, self.options):
            entries, cid = self.entries(model), claim_id(item)
            entry = entries.get((cid, self.options.tier.name)) or entries.get((cid, None))
            if (
                entry is not None
                and entry.get("verdict", "falsified") == "falsified"
                and self.same_setup(entry)
            ):
                return {"model": model, **entry}
        return None
