"""Unit tests of the tier-consistency rule (experiments/rules_tiers.py) on synthetic reports: it
holds when shared verdicts agree, is falsified when one changes, and is inconclusive with too few
shared claims or a single stored tier. Plain tests, no model."""

import pytest
import rules_tiers as rules
from hypothesis import given
from hypothesis import strategies as hs

from esa.claims.claim import Claim, ClaimFalsified, ClaimInconclusive

ORDER = ["smoke", "standard", "extended"]


def report(verdicts: dict[str, str], model: str = "m") -> dict:
    return {"claims": [{"id": i, "verdict": v, "context": {"model": model}} for i, v in verdicts.items()]}


def decide(reports: dict, min_shared: int = 2) -> Claim:
    claim = Claim()
    rules.verdicts_agree(claim, rules.tier_pairs(reports, "m", ORDER), min_shared)
    return claim


def test_same_verdicts_hold():
    same = {"a": "holds", "b": "falsified", "c": "falsified (recorded)"}
    claim = decide({"smoke": report(same), "standard": report(same)})
    assert claim.measured["agreement"]["value"] == 1.0 and claim.measured["shared"]["value"] == 3


def test_changed_verdict_falsifies_and_names_the_degradation():
    with pytest.raises(ClaimFalsified):
        claim = Claim()
        rows = rules.tier_pairs(
            {
                "smoke": report({"a": "holds", "b": "holds"}),
                "standard": report({"a": "holds", "b": "falsified"}),
            },
            "m",
            ORDER,
        )
        rules.verdicts_agree(claim, rows, 2)
    assert claim.measured["degradations"]["value"] == 1 and claim.measured["agreement"]["value"] == 0.5
    assert "b (smoke holds -> standard falsified)" in claim.measured["changed"]["value"]


def test_one_tier_or_too_few_shared_is_inconclusive():
    with pytest.raises(ClaimInconclusive):
        decide({"smoke": report({"a": "holds", "b": "holds"})})
    with pytest.raises(ClaimInconclusive):
        decide({"smoke": report({"a": "holds"}), "standard": report({"a": "falsified"})}, min_shared=2)


def test_undecided_and_other_models_are_not_compared():
    lower = {
        "claims": [
            *report({"a": "inconclusive", "b": "holds"})["claims"],
            {"id": "c", "verdict": "holds", "context": {"model": "x"}},
        ]
    }
    higher = report({"a": "falsified", "b": "holds", "c": "falsified"})
    rows = rules.tier_pairs({"smoke": lower, "standard": higher}, "m", ORDER)
    assert [r["id"] for r in rows] == ["b"]
    assert rules.tier_pairs({}, "m", ORDER) == []


@given(
    hs.dictionaries(
        hs.text("abc", min_size=1, max_size=3), hs.sampled_from(["holds", "falsified"]), min_size=1
    )
)
def test_identical_reports_never_falsify(verdicts):
    rows = rules.tier_pairs({"smoke": report(verdicts), "extended": report(verdicts)}, "m", ORDER)
    assert len(rows) == len(verdicts)
    rules.verdicts_agree(Claim(), rows, 1)  # raises nothing: every shared verdict agrees
