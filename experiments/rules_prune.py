"""Decision rule of the pruning claims (test_phase5_applications.py): the best sensitivity-guided
pruning against magnitude pruning at one sparsity (or N:M pattern) of a pruning table. Pure: reads a
table, records measurements, decides. Unit tests: test_rules_prune.py."""

import math

from esa.analyses.prune import compare_at
from esa.claims.claim import Claim


def beats_magnitude(claim: Claim, table, sparsity, gain: float) -> dict:
    """Holds iff improvement = (PPL_magnitude - PPL_best) / PPL_magnitude > ``gain``.

    ``esa.analyses.prune.compare_at(table, sparsity)`` picks best = the lowest PPL over every
    sensitivity-guided (metric, granularity) (all but magnitude and act_mag; NaN worst) and the
    magnitude baseline (per layer, else per row); Wanda (act_mag per row) is reported beside.
    Inconclusive when the table has no magnitude or no sensitivity-guided row there (nothing to
    compare); falsified when the improvement is not finite (the best method's PPL is not finite:
    it broke the model) or is <= ``gain``; a finite best against an infinite magnitude PPL is an
    improvement of 1. Measures improvement_vs_magnitude (key), improvement_vs_wanda, best,
    dense_ppl; returns the comparison.
    """
    cmp = compare_at(table, sparsity)
    if cmp["best"] is None or cmp["magnitude"] is None:
        claim.inconclusive(f"no magnitude or no sensitivity-guided pruning measured at {sparsity}")
    improvement = cmp["improvement_vs_magnitude"]
    claim.measure("improvement_vs_magnitude", improvement, key=True)
    claim.measure("improvement_vs_wanda", cmp["improvement_vs_wanda"])
    claim.measure("best", cmp["best"])
    claim.measure("dense_ppl", cmp["dense_ppl"])
    claim.check(math.isfinite(improvement), f"no finite improvement at {sparsity}: {cmp}")
    claim.expect(improvement, ">", gain, name="improvement_vs_magnitude")
    return cmp
