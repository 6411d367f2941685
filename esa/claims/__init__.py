"""The claim suite's pytest plugin (entry point ``esa`` -> ``esa.claims.plugin``): options and
markers, the ``claim`` and ``workbench`` fixtures, recorded outcomes, tiers and the reports.

Kept cheap to import: nothing here imports torch at module level."""
