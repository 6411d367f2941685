"""Phase 4–5 analyses built on models, metrics, selections and perturbations:

- super weights: the detector (``detect``; ``detect_report``, ``detect_controls``, ``detect_run``
  behind ``esa detect``) and single-weight edits with Yu et al.'s controls (``sweep``);
- where sensitivity sits: layer × component / head / expert aggregates (``components``), clusters
  of the top-k and metric correlations (``clusters``), stability over seeds and training
  checkpoints (``temporal``);
- scaling: measures over a model family (``scaling``) and power-law fits (``powerlaw``);
- damage: metric-guided pruning (``prune``), critical vs random sets grown until a damage target
  (``progressive``), flips-to-failure (``bitflip``), bit flips in the deployed dtype (``bitsearch``);
- security: tamper detection from sensitivity maps (``tamper``);
- downstream: multiple-choice tasks (``tasks``) and zero-shot accuracy (``zeroshot``).

Each module is imported on its own; nothing here imports ``runbook`` or ``claims``."""
