"""Decision rule of the tier-consistency claim (research plan: "the same verdicts at smoke, standard
and extended; no degradation across tiers") and the pure measurement it decides on.

The measurement reads stored claims reports (``claims.json`` of `esa.claims.report`), one per tier:
a claim is *decided* at a tier when its verdict there is ``holds`` or ``falsified`` (a recorded
falsification counts as falsified; inconclusive, skipped and error are undecided). For every pair of
stored tiers (lower, higher) the claims decided at both are compared by id; a *degradation* is a
claim that held at the lower tier and is falsified at the higher one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from esa.claims.claim import Claim

DECIDED = {"holds": "holds", "falsified": "falsified", "falsified (recorded)": "falsified"}


def decided_verdicts(report: Mapping, model: str) -> dict[str, str]:
    """Claim id -> "holds" | "falsified" for the claims of ``report`` run on ``model`` alone
    (``context.model`` equal to it) and decided there."""
    out = {}
    for c in report.get("claims", []):
        verdict = DECIDED.get(str(c.get("verdict", "")))
        if verdict and (c.get("context") or {}).get("model") == model:
            out[str(c["id"])] = verdict
    return out


def tier_pairs(reports: Mapping[str, Mapping], model: str, order: Sequence[str]) -> list[dict]:
    """One row per claim decided at two stored tiers: ``{"id", "lower", "higher", "lower_verdict",
    "higher_verdict"}``, tiers taken in ``order`` (lowest first)."""
    verdicts = {t: decided_verdicts(reports[t], model) for t in order if t in reports}
    rows = []
    for lower, higher in combinations([t for t in order if t in verdicts], 2):
        for cid in sorted(verdicts[lower].keys() & verdicts[higher].keys()):
            rows.append(
                {
                    "id": cid,
                    "lower": lower,
                    "higher": higher,
                    "lower_verdict": verdicts[lower][cid],
                    "higher_verdict": verdicts[higher][cid],
                }
            )
    return rows


def verdicts_agree(claim: Claim, rows: Sequence[Mapping], min_shared: int) -> None:
    """Holds when every claim decided at two tiers has the same verdict at both; falsified when any
    differs (the changed ids and the degradations are measured); inconclusive with fewer than
    ``min_shared`` claims decided at two tiers (fewer than two stored tiers, or too few decided)."""
    changed = [r for r in rows if r["lower_verdict"] != r["higher_verdict"]]
    degraded = [r for r in changed if r["lower_verdict"] == "holds"]
    agreement = 1.0 - len(changed) / len(rows) if rows else float("nan")
    claim.measure("shared", len(rows))
    claim.measure(
        "changed",
        [
            f"{r['id']} ({r['lower']} {r['lower_verdict']} -> {r['higher']} {r['higher_verdict']})"
            for r in changed
        ],
    )
    claim.measure("degradations", len(degraded))
    claim.measure("agreement", agreement, key=True)
    if len(rows) < min_shared:
        claim.inconclusive(
            f"{len(rows)} claims decided at two stored tiers (< {min_shared}): store the reports of "
            "two tiers (reports/<tier>/claims.json) to decide"
        )
    claim.check(
        not changed,
        f"{len(changed)} of {len(rows)} claims changed verdict across tiers "
        f"({len(degraded)} degraded from holds to falsified)",
    )
