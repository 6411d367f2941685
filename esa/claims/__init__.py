"""The claim suite's pytest plugin (entry point ``esa`` -> ``esa.claims.plugin``).

``plugin`` (hooks), ``options`` (``--esa-*``, `EsaOptions`), ``claim`` (`Claim`, verdicts),
``fixtures`` (``claim``, ``esa_options``, ``esa_workbench``, ``esa_header``), ``session``
(records from workers, reports at session end), ``recorded`` (known falsifications),
``report`` (claims.json/md/html), ``tiers`` (compute budgets), ``workbench`` (memoized
measurements). Kept cheap to import: only ``workbench`` imports torch at module level."""
