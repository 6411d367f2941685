"""``esa cache``: where the score cache is, how large, what it holds; clearing it.

    esa cache [list] [--json]          location, size and cap, then one line per entry (most recent first)
    esa cache clear --all              remove every score entry
    esa cache clear --older-than 7d    remove the entries unused for 7 days (units s, m, h, d; default d)

Only the score entries are managed (``esa.metrics.cache_store``: cap $ESA_CACHE_MAX_BYTES, least
recently used evicted first); the embedded model stored next to them stays. Wired into ``esa`` by
``esa.cli``: ``add_parser(subparsers)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import json
import re
import time

from esa.errors import ConfigError

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``cache`` subcommand on ``subparsers`` (``argparse`` sub-parsers of ``esa``)."""
    p = subparsers.add_parser("cache", help="list or clear the score cache (location, size, entries)")
    p.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    p.add_argument("--json", action="store_true", help="list: print JSON instead of a table")
    p.add_argument("--all", action="store_true", help="clear: remove every score entry")
    p.add_argument(
        "--older-than", default=None, help="clear: remove entries unused for this long, e.g. 7d, 12h"
    )
    return p


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '1.5' (days) -> seconds; ConfigError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--older-than {text!r} is not a duration; write e.g. 7d, 12h, 30m")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "d").lower()]


def main(args) -> int:
    """Run ``esa cache``; ConfigError (exit 2 in ``esa``) on options that do not fit the action."""
    from esa.metrics import cache_store

    if args.action == "list":
        if args.all or args.older_than is not None:
            raise ConfigError("--all and --older-than go with clear: esa cache clear --all")
        rows = [describe(e) for e in reversed(cache_store.entries(cache_store.scores_dir()))]
        info = cache_store.usage()
        if args.json:
            print(json.dumps({**info, "entries": rows}, indent=1))
        else:
            print("\n".join([cache_store.usage_line(info), *_table(rows)]))
        return 0
    if args.all == (args.older_than is not None):
        raise ConfigError("say what to clear: esa cache clear --all, or esa cache clear --older-than 7d")
    older = None if args.all else parse_duration(args.older_than)
    removed, freed = cache_store.clear(cache_store.scores_dir(), older)
    print(
        f"removed {removed} entries ({cache_store.human(freed)}); "
        + cache_store.usage_line(cache_store.usage())
    )
    return 0


def describe(entry) -> dict:
    """Plain facts of one cache entry: file, bytes, last use, model, metric, seed, kind."""
    from esa.metrics import cache_store

    row = {"file": entry.path.name, "bytes": entry.bytes, "last_used": entry.used}
    try:
        meta = cache_store.read_header(entry.path).get("__metadata__", {})
        key = json.loads(meta.get("esa_key", "{}"))
        kind = json.loads(meta.get("esa_entry", "null") or '{"kind": "full"}')["kind"]
    except Exception:  # not ours, truncated: listed as unreadable
        return {**row, "model": None, "metric": None, "seed": None, "kind": "unreadable"}
    return {
        **row,
        "model": key.get("model"),
        "metric": key.get("metric"),
        "seed": key.get("seed"),
        "kind": kind,
    }


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(0.0, seconds):.0f} s ago"


def _table(rows: list[dict]) -> list[str]:
    from esa.metrics.cache_store import human

    if not rows:
        return ["(no entries)"]
    now = time.time()
    head = f"{'last used':<12}{'size':>11}  {'kind':<11}{'model':<24}{'metric':<17}{'seed':>5}  file"
    return [head] + [
        f"{_age(now - r['last_used']):<12}{human(r['bytes']):>11}  {r['kind']:<11}{r['model'] or '?'!s:<24}"
        f"{r['metric'] or '?'!s:<17}{'?' if r['seed'] is None else r['seed']!s:>5}  {r['file']}"
        for r in rows
    ]
