"""Statistics for esa claims: scipy/numpy underneath, plain Python numbers out.

``core``: set overlaps, paired/Welch t-tests, BCa bootstrap CIs, Spearman, power-law fits.
``windows``: the paired bootstrap of ΔPPL over evaluation windows, the dominance rule of every
"A ≥ N× B" claim, the Wilcoxon test on per-window NLL and the empirical p-value against a null.
"""

from esa.stats.core import (
    bootstrap_ci,
    effect_ratio,
    jaccard,
    leave_one_out_errors,
    overlap,
    paired_ttest,
    power_law_fit,
    predict_power_law,
    spearman_monotonic,
    welch_ttest,
)
from esa.stats.windows import (
    WindowBootstrap,
    dominance,
    empirical_p_value,
    paired_window_test,
    percentile_ci,
    window_bootstrap,
)

__all__ = [
    "WindowBootstrap",
    "bootstrap_ci",
    "dominance",
    "effect_ratio",
    "empirical_p_value",
    "jaccard",
    "leave_one_out_errors",
    "overlap",
    "paired_ttest",
    "paired_window_test",
    "percentile_ci",
    "power_law_fit",
    "predict_power_law",
    "spearman_monotonic",
    "welch_ttest",
    "window_bootstrap",
]
