"""The esa fixtures: ``claim``, ``esa_options``, ``esa_workbench`` and ``esa_header``.

Registered by ``esa.claims.plugin`` in ``pytest_configure`` (never load this module yourself).
``esa_workbench`` is the claims' measurement session (``esa.claims.workbench``), not the speed
benchmark ``esa.bench``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from esa.claims.claim import Claim, claim_for
from esa.claims.options import HEADER_KEY, OPTIONS_KEY, EsaOptions
from esa.claims.shared import WORKER_INPUT, SharedResults
from esa.claims.tiers import TIERS

if TYPE_CHECKING:
    from esa.claims.workbench import Workbench


@pytest.fixture
def claim(request: pytest.FixtureRequest) -> Claim:
    """This test's `Claim`: ``claim("statement", threshold=..., key=...)``, ``claim.measure(...)``.
    Its figures get PDF/SVG copies (papers) except at the cheapest tier (smoke: CI time)."""
    c = claim_for(request.node)
    c.vector_figures = request.config.stash[OPTIONS_KEY].tier.name != next(iter(TIERS))
    return c


@pytest.fixture(scope="session")
def esa_options(pytestconfig: pytest.Config) -> EsaOptions:
    """The resolved esa options (models, metrics, tier, device, data, ...)."""
    return pytestconfig.stash[OPTIONS_KEY]


@pytest.fixture(scope="session")
def esa_workbench(pytestconfig: pytest.Config) -> Iterator[Workbench]:
    """The session's :class:`esa.claims.workbench.Workbench`: models loaded once, measurements
    memoized (imported here, not at plugin import: it needs torch), and under xdist shared with
    the other workers (`esa.claims.shared`). Evaluation text ``--esa-data``,
    calibration text ``--esa-calib-data``; at the end the data manifest of every model whose data
    was prepared goes to the report header (``header["data"][model]``)."""
    from esa.claims.workbench import Workbench

    o = pytestconfig.stash[OPTIONS_KEY]
    device = None if o.device == "auto" else o.device
    data = str(o.data) if o.data else None
    shared = SharedResults(getattr(pytestconfig, "workerinput", {}).get(WORKER_INPUT))
    wb = Workbench(o.tier, device=device, data=data, calib_data=o.calib_spec, bos=o.bos, shared=shared)
    yield wb
    prepared = [k[1] for k in getattr(wb, "_memo", {}) if k[0] == "data"]  # never loads anything
    manifests = pytestconfig.stash[HEADER_KEY].setdefault("data", {})
    manifests.update({name: wb.data_manifest(name) for name in prepared})


@pytest.fixture(scope="session")
def esa_header(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Mutable dict merged into the report header (e.g. ``esa_header["windows_sha256"] = h``)."""
    return pytestconfig.stash[HEADER_KEY]
