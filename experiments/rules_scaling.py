"""Decision rules of the phase-4 scaling claims: pure functions of a `Claim` and plain values."""

from __future__ import annotations

import math
from collections.abc import Sequence

from esa.claims.claim import Claim


def points_fittable(claim: Claim, measure: str, values: Sequence[float]) -> None:
    """A power law ``value = c * n**alpha`` (c > 0) needs a positive, finite value on every model.

    Non-finite on some model (e.g. an infinite super/random ratio when random weights did no
    damage): the fit is undefined, the claim is inconclusive (never falsified on an inf). Finite but
    <= 0 on some model: no such power law exists, the claim is falsified."""
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        claim.inconclusive(f"{measure} is not finite on every model: {values}")
    claim.check(all(v > 0 for v in values), f"{measure} is not positive on every model: {values}")
