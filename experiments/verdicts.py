"""The one helper the decision-rule unit tests share: run a rule on a fresh synthetic `Claim` and
name its verdict (holds / falsified / inconclusive)."""

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive

HOLDS, FALSIFIED, INCONCLUSIVE = "holds", "falsified", "inconclusive"


def verdict(rule, *args, **kwargs) -> tuple[str, Claim]:
    """Run ``rule`` on a fresh Claim: its verdict and the claim (measurements, checks)."""
    claim = Claim("synthetic")
    try:
        rule(claim, *args, **kwargs)
    except ClaimFalsified:
        return FALSIFIED, claim
    except ClaimInconclusive:
        return INCONCLUSIVE, claim
    assert claim.checks and claim.checks[-1]["ok"] is True, "a rule that holds ends with a passed check"
    return HOLDS, claim
