"""Phase 4–5 analyses built on models, metrics, selections and perturbations: the super-weight
detector (``detect``), layer × component aggregates (``components``), scaling fits (``scaling``),
metric-guided pruning (``prune``), bit-flip curves (``bitflip``) and zero-shot accuracy
(``zeroshot``). Each module is imported on its own; nothing here imports ``runbook`` or ``claims``."""
