"""Every success criterion of the research plan, stated once. Claims import their thresholds
from here; changing one is a change to the research plan, reviewed like one.

Names of perturbations and metrics must be registered in ``esa.perturb.PERTURBATIONS`` and
``esa.metrics.METRICS`` (checked at collection, experiments/conftest.py); the claims' tiers are
``esa.claims.tiers.TIERS``, their tiny architectures ``esa.models.tiny.tiny_models()``."""

# phase 1: baseline
LEAK_PPL = 1.5  # PPL below this on natural text means a bug (repeated text, leaked labels)
PPL_SEED_VARIATION = 0.05  # relative half-width of the baseline PPL's 95% CI over eval windows
TIER_MIN_SHARED = 10  # claims decided at two stored tiers before "same verdicts across tiers" decides

# phase 2: sensitivity profiling
JACCARD_STABLE = 0.30  # top-k Jaccard across calibration seeds
JACCARD_STRONG = 0.50  # reported alongside: "strongly stable"
JACCARD_PLAN = 0.40  # research plan: top-k Jaccard across seeds > 0.4 for every major model run
HEAVY_TAIL_RATIO = 10.0  # mean of the top 1% of scores / median score
HEAVY_TAIL_P = 0.05  # ... and beyond its null: empirical p-value below this
HEAVY_TAIL_NULL_DRAWS = 49  # null draws (permutations) per heavy-tail claim: p >= 1/50
METRIC_AGREEMENT = 0.60  # grad_x_weight vs grad_squared top-k overlap
MODE_AGREEMENT = 0.50  # global top-(k x tensors) vs per_layer top-k, equal budgets (overlap)
HUTCHINSON_AGREEMENT = 0.50  # hutchinson_diag vs grad_x_weight top-k overlap
ACT_MAG_BAND = (0.40, 0.60)  # research plan: act_mag vs grad_x_weight top-k overlap 40-60%
TOP_LAYER_FRACTION = 0.10  # research plan: the top 10% of layers (by summed score) ...
TOP_LAYER_MASS = 0.50  # ... hold most (> 50%) of the total score mass

# phase 3: perturbation
SUPER_VS_RANDOM = 3.0  # ΔPPL(super) >= 3 x ΔPPL(random)
RANDOM_VS_BOTTOM = 3.0  # ΔPPL(random) >= 3 x ΔPPL(bottom)
MIN_SUPER_DAMAGE = 0.1  # ΔPPL(super) >= 0.1 PPL (its window-bootstrap CI lower bound)
P_VALUE = 0.05  # super vs random: one-sided Wilcoxon on per-window ΔNLL; empirical p vs the null
P_STRICT = 0.01  # research plan: super vs random at p < 0.01 for every perturbation type
SIGN_FLIP_VS_RANDOM = 5.0  # research plan: ΔPPL(super) >= 5 x ΔPPL(random) under sign_flip
PERTURBATIONS = ("zero", "sign_flip", "gauss_noise", "bit_flip")  # defaults: esa.perturb registry
NULL_SETS = 20  # random sets forming the null distribution of the super set's ΔPPL (one null for every seed)
NULL_PERTURBATIONS = ("zero", "sign_flip")  # perturbations whose super set meets that null
DOSE_MULTIPLES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # gauss_noise σ as multiples of its default
BIT_POSITIONS = ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb")  # bit_flip sweep

# phase 4: scaling and architecture
SCALING_R2 = 0.80  # power-law fit of a sensitivity measure vs parameter count
SCALING_PREDICTION = 0.20  # the largest model predicted from the others within 20%
SCALING_MEASURES = ("concentration", "super_random_ratio", "weights_to_double")
# issue 11: fits only on scale-free quantities (a count of weights grows with the model whenever
# sensitivity is diffuse, so its R² is near-automatic); esa.analyses.scaling.QUANTITIES names each
SCALING_SCALE_FREE = ("concentration", "super_random_ratio", "fraction_to_double")

# phase 5: applications
SUPER_WEIGHT_VS_RANDOM = 3.0  # ΔPPL(zero the detected super weight) >= 3x ΔPPL(zero one random weight)
ACTIVATION_RECOVERY = 0.50  # restoring the super activation recovers >= half of the damage (in NLL)
PRUNE_SPARSITY = 0.50  # pruning comparison at 50% unstructured sparsity
PRUNE_GAIN = 0.15  # best sensitivity-guided method beats magnitude by > 15% (PPL)
FLIP_RATIO = 10.0  # critical weights fail the model with >= 10x fewer flips than random
FLIP_FAILURE_FACTOR = 10.0  # "failure" = PPL >= 10x baseline, or non-finite
# issue 11: the detector's controls, the paper's scale sweep, tamper detection, bf16 bit flips
DETECTOR_NULL_DRAWS = 100  # random single weights of the super weight's tensor, each zeroed alone
DETECTOR_P = 0.01  # super weight beyond that null: empirical p < 0.01 (100 draws give p >= 1/101)
MAGNITUDE_CONTROL_K = 7000  # Yu et al. 2024 "Prune Non-SW": the 7,000 largest-|w| other weights
SWEEP_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # the super weight scaled by f (Yu et al. 2024)
SWEEP_CATASTROPHE = 10.0  # removing the super weight (f = 0) is catastrophic: PPL >= 10x PPL(f = 1)
TAMPER_METRIC = "act_mag"  # score maps compared (|w| x input norm: a weight change shows where it is)
TAMPER_MARGIN = 1.0  # detected: score shift > the largest calibration-noise shift of its tensor
TAMPER_PLANT = 20.0  # the planted change: one random weight set to 20x its tensor's RMS
FLIP_DTYPE = "bf16"  # bit flips in the dtype the model is deployed in
FLIP_SEARCH_STEPS = 16  # progressive (BFA-style) sensitivity-guided bit search: at most 16 flips
FLIP_RANDOM_MAX = 1024  # random (weight, bit) flips tried: 1, 2, 4, ..., 1024
FLIP_POSITION_WEIGHTS = 16  # per bit position: flips in this many random weights, one at a time
ZEROSHOT_TASKS = ("arc_easy", "boolq", "hellaswag", "piqa")  # local samples in fixtures/zeroshot
ZEROSHOT_DROP = 10.0  # zeroing the super set drops pooled zero-shot accuracy >= 10 points vs random
ZEROSHOT_LEVEL = 0.95  # Newcombe (Wilson) CI of that drop; decided only when its half-width <= DROP / 2
RANK_METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared")  # super weight's rank under each
PRUNE_METHODS = (  # (metric, granularity) compared at PRUNE_SPARSITY; act_mag per row = Wanda
    ("magnitude", "layer"),
    ("magnitude", "row"),
    ("act_mag", "row"),
    ("grad_x_weight", "row"),
    ("grad_x_weight", "layer"),
    ("grad_squared", "row"),
    ("hutchinson_diag", "row"),
)
PRUNE_TABLE = (0.1, 0.2, 0.3, 0.4, 0.5, "2:4")  # the full table: unstructured and 2:4 (Wanda's)
PRUNE_PATTERN = "2:4"  # the table's claim: the same PRUNE_GAIN comparison at 2:4 semi-structured
PRUNE_SMOKE_SKIP = ("hutchinson_diag",)  # curvature scores (2 backward passes per sample): not at smoke

# phase 5: the old runner's analyses (issue 13)
PROGRESSIVE_METHOD = "zero"  # progressive perturbation: the runner's method when --perturb names none
PROGRESSIVE_FACTOR = 2.0  # its damage target: PPL >= 2 x baseline (esa.analyses.progressive default)
PROGRESSIVE_RATIO = 10.0  # critical weights reach it with >= 10x fewer weights than random ones
PROGRESSIVE_MAX_WEIGHTS = 4096  # the largest set grown (1, 2, 4, ...; the analysis' default cap)
ADVANCED_PERTURBATIONS = ("adaptive_noise", "magnitude_scaling", "quantization")  # registered defaults
COLUMN_SHARE_VS_RANDOM = 3.0  # top-k's share in its tensor's most common column >= 3x a random set's
CLUSTERING = ("kmeans", 5)  # clusters of the top-k reported beside it (the runner's defaults)

# phase 5.3: interpretability of the super weight (issue 11)
# The super activation persists: the residual-stream max after the super layer (median over the later
# layers) stays >= 10x the median residual max entering layers <= the super layer -- the detector's own
# spike ratio (esa.analyses.detect, ratio=10: "far above the other layers", Yu et al. 2024).
PERSIST_FACTOR = 10.0
# Yu et al. 2024: removing the super weight amplifies stop-word probabilities (Llama-7B; the factor is
# not in the shared REFERENCES.md, recalled as ~2x or more): the mean stop-word mass must at least
# double -- a ratio of means, decided on its paired bootstrap CI over evaluation windows.
STOPWORD_FACTOR = 2.0
# a fixed English stop-word list (NLTK-style core), space-separated; its " word" single tokens count
STOPWORDS = (
    "the a an and or but of to in on at for with by from as is was are were be been it its this that "
    "these those he she they we you i his her their not no so if than then there which who what when "
    "has have had do does did"
)
INTERPRET_WINDOWS = 2  # tracing and attention-sink claims: the first 2 evaluation windows (smoke cost)

# phase 5.3: weight roles per attention head (issue 11). Chosen before any result on a real model was
# seen (none of these was tuned): cells are head slices (layer, q/k/v/o projection, head); the null
# puts the selection's attention entries in proportion to each cell's number of weights.
HEAD_TOP_FRACTION = 0.10  # the top 10% of head cells, as the research plan's TOP_LAYER_FRACTION for layers
HEAD_CONCENTRATION = 2.0  # ... hold >= 2x their share of the attention weights (at least doubled, as
# STOPWORD_FACTOR), and beyond the multinomial null:
HEAD_P = 0.01  # empirical p of that concentration under the proportional null, as P_STRICT / DETECTOR_P
HEAD_NULL_DRAWS = 999  # multinomial draws of the null (seeded): p >= 1/1000
# Cochran (1954): every cell's expected count >= 1, else too few attention entries: inconclusive
HEAD_MIN_EXPECTED = 1.0
