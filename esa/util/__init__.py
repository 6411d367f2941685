"""Small helpers with no esa dependencies but ``esa.errors`` (the bottom layer).

- ``serialize``: plain Python types, strict JSON with NaN/inf as strings.
- ``files``: sha256 of files and text, atomic writes, esa's user cache directory.
- ``bits``: integer views of float tensors, checksums, bit widths.
- ``runtime``: run environment, git commit, seeded RNG, GPU placement and peak memory.
- ``memory``: peak resident set (and GPU memory) of a stretch of code, without importing torch.
- ``sampling``: seeded sampling without replacement and random tie-breaking priorities.
"""
