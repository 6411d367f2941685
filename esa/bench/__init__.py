"""Speed and memory benchmark, esa against plain transformers (``python -m esa.bench``;
results in BENCHMARKS.md and bench/results/*.json)."""
