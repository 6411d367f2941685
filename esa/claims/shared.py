"""Measurements shared by the xdist workers of one claims session: each is computed once.

Under ``pytest -n 2`` each worker has its own `esa.claims.workbench.Workbench`, so two workers
that need the same perturbed evaluation (a cross-perturbation claim reads every perturbation's
sets) or the same baseline would both compute it. `SharedResults` keeps such results as JSON
files in a directory the controller makes for the session (handed to the workers through
``workerinput``, removed at the end): the first worker to ask computes under a file lock
(`filelock`), a worker asking meanwhile waits for it, and every later ask reads the file. Only
deterministic measurements are shared (the same model, windows and condition give the same
numbers in every process; floats round-trip exactly through JSON), so a claim's numbers do not
depend on which worker computed them. Without a directory (no xdist) it just computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from esa.util.files import atomic_write

WORKER_INPUT = "esa_shared_dir"  # workerinput key carrying the directory


class SharedResults:
    """Results keyed by a tuple of plain values (its ``repr`` is the identity), in ``root``."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def _path(self, key: tuple) -> Path:
        assert self.root is not None
        return self.root / hashlib.sha256(repr(key).encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def lock(self, key: tuple) -> Iterator[None]:
        """Hold ``key``'s lock (no-op without a directory): work done under it by one worker is
        not started by another meanwhile (e.g. a score computation that the cache then serves)."""
        if self.root is None:
            yield
            return
        with FileLock(str(self._path(key)) + ".lock"):
            yield

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``'s JSON-able result for ``key``, computed by the first worker to ask."""
        if self.root is None:
            return compute()
        path = self._path(key).with_suffix(".json")
        if not path.exists():
            with self.lock(key):
                if not path.exists():
                    atomic_write(path, json.dumps(compute()))
        return json.loads(path.read_text(encoding="utf-8"))


def make_root() -> str:
    """A fresh directory for one session's shared results."""
    return tempfile.mkdtemp(prefix="esa-shared-")


def remove_root(root: str | None) -> None:
    if root:
        shutil.rmtree(root, ignore_errors=True)
