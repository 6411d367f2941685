"""Recorded outcomes: claims already known to be falsified on a model.

``<rootdir>/experiments/recorded/<model>.json`` (ini ``esa_recorded``) holds a JSON list of
``{"claim_id", "measured", "date", "note"}`` (optionally ``"tier"`` and ``"data_sha256"``: the
entry then applies only to runs at that tier and on that data). ``claim_id`` is the nodeid
relative to rootdir. An item matches when its claim id is in the file of its model parameter (or,
for items without one, of any ``--esa-model``) and the setup agrees; the plugin then marks it
``xfail(strict=True)``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from esa.errors import ConfigError
from esa.util.files import atomic_write, file_sha256
from esa.util.serialize import decode, dumps, plain

if TYPE_CHECKING:  # pytest and the options only for annotations: esa.cli imports this module
    import pytest

    from esa.claims.options import EsaOptions

MODEL_PARAMS = ("model", "profiled", "arch")  # parameters whose value names the model under test


def load_recorded(path) -> dict[str, dict]:
    """{claim_id: entry} from a recorded-outcomes file (a JSON list); {} when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {e["claim_id"]: decode(e) for e in entries}
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{path}: expected a JSON list of {{claim_id, measured, date, note}} ({e})"
        ) from None


def record_outcome(
    recorded_dir,
    model: str,
    claim_id: str,
    measured: dict,
    note: str = "",
    day: str | None = None,
    tier: str | None = None,
    data_sha256: str | None = None,
) -> Path:
    """Add (or replace) the recorded falsification of `claim_id` in ``<recorded_dir>/<model>.json``.

    With ``tier`` / ``data_sha256`` the entry applies only to runs at that tier and on that data
    (verdicts depend on both)."""
    path = Path(recorded_dir) / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {k: v for k, v in load_recorded(path).items() if k != claim_id}
    entry = {
        "claim_id": claim_id,
        "measured": plain(measured),
        "date": day or datetime.now().date().isoformat(),
        "note": note,
    }
    if tier:
        entry["tier"] = tier
    if data_sha256:
        entry["data_sha256"] = data_sha256
    entries[claim_id] = entry
    atomic_write(path, dumps(sorted(entries.values(), key=lambda e: e["claim_id"]), indent=1) + "\n")
    return path


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
        self._files: dict[str, dict[str, dict]] = {}
        self._data_sha256: list[str | None] = []  # computed on first need

    def entries(self, model: str) -> dict[str, dict]:
        """{claim_id: entry} of ``<recorded_dir>/<model>.json`` (ConfigError when malformed)."""
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
            entry = self.entries(model).get(claim_id(item))
            if entry is not None and self.same_setup(entry):
                return {"model": model, **entry}
        return None
