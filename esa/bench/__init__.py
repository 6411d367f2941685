"""Speed and memory benchmark, esa against plain transformers (``python -m esa.bench``; results in
BENCHMARKS.md and bench/results/*.json). The same code paths serve ``esa run``: nothing here is a
benchmark-only fast path.

- ``harness``: ``Bench`` (results, JSON, deadlines), ``Section``, ``timed``, ``run_sections``;
- ``baselines``: the plain-transformers references ``plain_eval``, ``plain_grad_x_weight``;
- ``sections``, ``sections_scoring``: the sections (env, eval, score, hutchinson, select,
  perturb, runbook, multi) and ``RUNNERS``;
- ``markdown``: the BENCHMARKS.md tables of a results dict;
- ``cli``: ``main(argv=None)``, the command line.
"""

from esa.bench.cli import main

__all__ = ["main"]
