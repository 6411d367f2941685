"""The score cache on disk: one safetensors file per entry in ``<cache_dir>/scores/``, bounded in
size, least recently used entries evicted first; never pickle.

- Location: ``esa.util.files.cache_dir() / "scores"`` ($ESA_CACHE_DIR, $XDG_CACHE_HOME/esa,
  ~/.cache/esa). Only ``*.safetensors`` entries there (and stale temp files) are managed; the
  embedded model next to them is not.
- Cap: $ESA_CACHE_MAX_BYTES (bytes, or a number with K, M, G, T: binary units; 0 keeps nothing),
  default ``DEFAULT_MAX_BYTES`` = 2 GiB. Before a write, the least recently used entries go until
  total + new ≤ cap; an entry larger than the cap is not written.
- Recency: an entry's mtime, set when it is written and when it is read (``touch``).
- Free space: a write needs new + ``RESERVE_BYTES`` free on the disk (``shutil.disk_usage``).
- A write that cannot happen (cap, disk, permissions, ENOSPC) logs one warning line, leaves no
  partial file (``esa.util.files.atomic_write``) and never raises: the run goes on without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esa.errors import ConfigError
from esa.util.files import atomic_write, cache_dir

log = logging.getLogger("esa")
DEFAULT_MAX_BYTES = 2 << 30
RESERVE_BYTES = 256 << 20  # left free on the disk after a write
STALE_TMP_S = 3600  # a temp file untouched this long belongs to a dead writer
SUFFIX = ".safetensors"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Entry:
    """One cache file: its path, size in bytes and last use (mtime, seconds since the epoch)."""

    path: Path
    bytes: int
    used: float


def scores_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of score entries under ``root`` (default: esa's user cache)."""
    return Path(root if root else cache_dir()) / "scores"


def parse_bytes(text: str) -> int:
    """'2147483648', '2G', '500M', '1.5GiB' -> bytes (binary units); ConfigError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"cache size {text!r} is not a size; write bytes or e.g. 2G, 500M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def max_bytes() -> int:
    """The cache cap: $ESA_CACHE_MAX_BYTES, else ``DEFAULT_MAX_BYTES``."""
    env = os.environ.get("ESA_CACHE_MAX_BYTES")
    return DEFAULT_MAX_BYTES if env is None or not env.strip() else parse_bytes(env)


def human(n: float) -> str:
    """Bytes as text with a binary unit: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def entries(folder: Path) -> list[Entry]:
    """The entries in ``folder``, least recently used first (unreadable ones left out)."""
    out = []
    for path in folder.glob(f"*{SUFFIX}") if folder.is_dir() else []:
        try:
            st = path.stat()
        except OSError:
            continue  # removed meanwhile (another process evicted it)
        out.append(Entry(path, int(st.st_size), float(st.st_mtime)))
    return sorted(out, key=lambda e: (e.used, e.path.name))


def usage(root: str | os.PathLike | None = None) -> dict:
    """Where the score cache is and how large: plain types (the ``esa run`` summary line)."""
    folder = scores_dir(root)
    found = entries(folder)
    try:
        cap: int | None = max_bytes()
    except ConfigError:  # a bad $ESA_CACHE_MAX_BYTES: every write says so
        cap = None
    return {
        "path": str(folder),
        "entries": len(found),
        "bytes": sum(e.bytes for e in found),
        "max_bytes": cap,
    }


def usage_line(info: dict) -> str:
    """'score cache: PATH (N entries, X of Y cap)' from ``usage``."""
    cap = "an invalid $ESA_CACHE_MAX_BYTES" if info["max_bytes"] is None else human(info["max_bytes"])
    return f"score cache: {info['path']} ({info['entries']} entries, {human(info['bytes'])} of {cap} cap)"


def touch(path: Path) -> None:
    """Mark ``path`` as used now (LRU); a failure is ignored (read-only cache)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def read_header(path: Path) -> dict:
    """The JSON header of an entry (metadata included) without reading its tensors."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100 << 20:
            raise ValueError("not a safetensors file")
        return json.loads(fh.read(size))


def remove(entry: Entry) -> int:
    """Delete ``entry``; the bytes freed (0 when it was gone already or cannot be removed)."""
    try:
        entry.path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("esa: score cache entry %s not removed (%s)", entry.path.name, exc.strerror or exc)
        return 0
    return entry.bytes


def evict(folder: Path, need: int, cap: int, keep: Path | None = None) -> int:
    """Remove least recently used entries (never ``keep``) until total + ``need`` ≤ ``cap``;
    returns the bytes freed."""
    found = [e for e in entries(folder) if e.path != keep]
    total = sum(e.bytes for e in found)
    freed = 0
    for entry in found:
        if total - freed + need <= cap:
            break
        freed += remove(entry)
    return freed


def clear(folder: Path, older_than_s: float | None = None) -> tuple[int, int]:
    """Remove every entry (or those unused for ``older_than_s`` seconds) and stale temp files;
    returns (entries removed, bytes freed)."""
    now, removed, freed = time.time(), 0, 0
    for entry in entries(folder):
        if older_than_s is None or now - entry.used > older_than_s:
            freed += remove(entry)
            removed += not entry.path.exists()
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
    return removed, freed


def write(path: Path, blob: bytes | Callable[[Path], None], size: int | None = None) -> bool:
    """Store ``blob`` at ``path`` within the cap and the free space; True when written. ``blob``
    may be a function that writes the file at the path it is given (a streaming serializer: no
    second copy of the entry in memory), with its ``size`` in bytes (an upper bound). Every
    failure is one warning line (or an info line when the cap alone rules it out), never raised."""
    try:
        size = len(blob) if size is None else int(size)  # type: ignore[arg-type]
        cap = max_bytes()
        if size > cap:
            log.info("esa: score cache entry of %s exceeds the %s cap; not cached", human(size), human(cap))
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        evict(path.parent, size, cap, keep=path)
        free = shutil.disk_usage(path.parent).free
        if free < size + RESERVE_BYTES:
            log.warning(
                "esa: score cache not written: %s needed, %s free on %s; free space or set ESA_CACHE_DIR",
                human(size + RESERVE_BYTES),
                human(free),
                path.parent,
            )
            return False
        atomic_write(path, blob)
        return True
    except Exception as exc:  # a side job: never fail the run
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        log.warning("esa: score cache not written (%s); the run goes on without it", reason)
        return False
