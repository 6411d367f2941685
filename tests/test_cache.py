"""The score cache: candidates select exactly like whole scores, the cache stays small and bounded
(LRU under a cap), a failed write only warns, and ``esa cache`` lists and clears it."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import esa.metrics.registry
from esa import cli_cache
from esa.cli import main as esa_main
from esa.data import prepare_data
from esa.errors import ConfigError
from esa.metrics import cache_store
from esa.metrics.cache import cached_scores, encode_candidates, entry_path, load_entry
from esa.metrics.candidates import build_candidates, candidate_cap
from esa.models import load_model
from esa.runbook import ExperimentConfig, run_experiment
from esa.select import select

TINY = [
    "--model",
    "tiny-llama",
    "--max-length",
    "32",
    "--max-samples",
    "2",
    "--batch-size",
    "2",
    "--data-file",
    "builtin",
]
RUN = [*TINY, "--no-progress", "--topk", "3", "--perturb", "zero", "--controls", "random_k,bottom_k"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ESA_CACHE_MAX_BYTES", raising=False)


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-llama")
    return lm, prepare_data(lm.tokenizer, "builtin", None, 32, 2, calib_windows=2)


def _scores(tiny, **kw):
    lm, data = tiny
    names = lm.param_map.scorable()
    args = dict(calib_windows=2, batch_size=2, hutchinson_samples=1, names=names, progress=False)
    return cached_scores(lm, data, kw.pop("metric", "grad_x_weight"), kw.pop("seed", 0), **args, **kw)


def _forbid_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("scores should come from the cache")

    monkeypatch.setattr(esa.metrics.registry, "compute_scores", fail)


# --- candidates answer select exactly ------------------------------------------------------------

_VALUES = st.sampled_from([0.0, 0.0, 1.0, 1.0, 2.0, -1.0, 3.5, float("nan"), float("inf")])


@st.composite
def _problem(draw):
    shapes = draw(st.lists(st.sampled_from([(3,), (1, 4), (7, 9), (12, 12), (40,)]), min_size=1, max_size=3))
    scores, weights = {}, {}
    for i, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        raw = draw(st.lists(_VALUES | st.floats(-4, 4, width=32), min_size=n, max_size=n))
        scores[f"t{i}"] = torch.tensor(raw, dtype=torch.float32).reshape(shape)
        weights[f"t{i}"] = torch.tensor(
            draw(st.lists(st.sampled_from([0.0, 1.0, -2.0]), min_size=n, max_size=n))
        )
        weights[f"t{i}"] = weights[f"t{i}"].reshape(shape)
    return scores, weights


@settings(max_examples=60, deadline=None)
@given(
    _problem(),
    st.integers(1, 5),
    st.sampled_from(["top", "bottom", "random"]),
    st.sampled_from(["per_layer", "global"]),
    st.sampled_from([0, 0, 7]),
    st.sampled_from(["none", "nonzero", "all", "some"]),
    st.data(),
)
def test_candidates_select_like_whole_scores(problem, max_k, kind, mode, seed, restrict, data):
    """For every k <= max_k, any kind, mode, seed and eligible mask: the same entries, values and
    exclusions as from the whole scores, also after a round trip through a cache file. Where the
    candidates prove the answer (the entry's seed 0; eligible none, w != 0 or all) nothing is
    recomputed."""
    scores, weights = problem
    k = data.draw(st.integers(1, max_k))
    masks = {
        "none": None,
        "nonzero": {n: w != 0 for n, w in weights.items()},
        "all": {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()},
        "some": {
            n: torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
            for n, w in weights.items()
        },
    }
    eligible = masks[restrict]
    try:
        want = select(scores, k, kind, mode, seed, "m", eligible)
    except ConfigError:
        want = None
    cands = build_candidates(scores, candidate_cap(max_k), 0, weights)
    with tempfile.TemporaryDirectory() as tmp:  # the cache file round trip
        path = Path(tmp) / "e.safetensors"
        path.write_bytes(encode_candidates({"k": 1}, cands))
        shapes = {n: tuple(s.shape) for n, s in scores.items()}
        loaded = load_entry(path, {"k": 1}, shapes, full=False, cap=candidate_cap(max_k), seed=0)
    assert repr(loaded.summary) == repr(cands.summary)  # NaN / inf kept
    recomputed = []
    loaded.params, loaded.recompute = weights, lambda: recomputed.append(1) or scores
    if want is None:
        with pytest.raises(ConfigError):
            select(loaded, k, kind, mode, seed, "m", eligible)
        return
    got = select(loaded, k, kind, mode, seed, "m", eligible)
    assert (got.kind, got.mode, got.k, got.seed, got.shapes, got.excluded) == (
        want.kind,
        want.mode,
        want.k,
        want.seed,
        want.shapes,
        want.excluded,
    )
    for name in scores:
        assert torch.equal(got.indices[name], want.indices[name])
        if kind != "random":
            assert torch.allclose(got.values[name], want.values[name], equal_nan=True)
    if seed == 0 and restrict != "some":
        assert not recomputed


def test_candidates_recompute_only_when_needed():
    """Another seed reaching into a tie at the list's end cannot be decided from candidates:
    the whole scores are recomputed once and give the answer."""
    scores = {"a": torch.zeros(50, 50)}
    cands = build_candidates(scores, candidate_cap(2), 0)
    calls = []
    cands.recompute = lambda: calls.append(1) or scores
    assert torch.equal(
        select(cands, 2, "top", seed=0).indices["a"], select(scores, 2, "top", seed=0).indices["a"]
    )
    assert calls == []
    assert torch.equal(
        select(cands, 2, "top", seed=5).indices["a"], select(scores, 2, "top", seed=5).indices["a"]
    )
    assert calls == [1]
    cands = build_candidates(scores, candidate_cap(2), 0)
    with pytest.raises(ConfigError, match="recompute"):
        select(cands, 2, "top", seed=5)


# --- the cache on a runbook ----------------------------------------------------------------------


def test_three_seed_two_metric_run_caches_under_half_the_weights(tmp_path, monkeypatch):
    """Must show (issue 12): a 3-seed, 2-metric run leaves less than half the model's fp32 weight
    bytes in the cache; a rerun takes every selection from it."""
    config = ExperimentConfig(
        model="tiny-llama",
        metrics=["grad_x_weight", "magnitude"],
        seeds=[0, 1, 2],
        topk=3,
        max_samples=2,
        max_length=32,
        batch_size=2,
        perturbations=["zero"],
        controls=["bottom_k"],
        progress=False,
        cache_root=str(tmp_path / "c"),
    )
    lm = load_model("tiny-llama")
    first = run_experiment(config, lm=lm)
    weight_bytes = sum(p.numel() * 4 for p in lm.model.parameters())
    info = first.protocol["score_cache"]
    assert info["entries"] == 6 and info["path"] == str(tmp_path / "c" / "scores")
    assert 0 < info["bytes"] < weight_bytes / 2, (info["bytes"], weight_bytes)
    _forbid_compute(monkeypatch)
    again = run_experiment(config, lm=lm)
    for key, sel in first.selections.items():
        assert sel.keys() == again.selections[key].keys()
    assert [r["n_weights"] for r in first.rows] == [r["n_weights"] for r in again.rows]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "esa"]


def test_full_disk_run_completes_with_one_warning(tmp_path, capsys, caplog, monkeypatch):
    """Must show: with no free space on the cache's disk the run completes (exit 0), each skipped
    write is one warning line, no traceback, no file written."""
    usage = type("Usage", (), {"total": 1 << 30, "used": 1 << 30, "free": 0})
    monkeypatch.setattr(cache_store.shutil, "disk_usage", lambda path: usage)
    code = esa_main(["run", *RUN, "--seeds", "0", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    (line,) = _warnings(caplog)
    assert "score cache not written" in line and "\n" not in line
    assert list((tmp_path / "cache" / "scores").iterdir()) == []


def test_enospc_mid_write_leaves_no_partial_file(tiny, tmp_path, caplog, monkeypatch):
    """A write that fails half way (ENOSPC) warns once and leaves no partial or temp file; the
    scores still come back (the run goes on)."""
    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, blob):
            self.fh.write(blob[: len(blob) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode="r", *a, **k):
        fh = real(fd, mode, *a, **k)
        return Full(fh) if "scores" in os.readlink(f"/proc/self/fd/{fd}") else fh

    monkeypatch.setattr(os, "fdopen", fdopen)
    cands = _scores(tiny)
    assert select(cands, 3, "top").size == 3 * len(cands)
    (line,) = _warnings(caplog)
    assert "No space left on device" in line and "\n" not in line
    assert [p.name for p in cache_store.scores_dir().iterdir()] == []


# --- whole tensors on request --------------------------------------------------------------------


def test_full_entry_answers_both_requests_and_candidates_only_theirs(tiny, monkeypatch):
    """Whole tensors come back whole and also give candidates; a candidate entry never stands for
    whole tensors, nor for more entries than it keeps."""
    whole = _scores(tiny, full=True)
    assert isinstance(whole, dict) and all(isinstance(v, torch.Tensor) for v in whole.values())
    _scores(tiny, metric="magnitude")  # a candidates entry
    _forbid_compute(monkeypatch)
    again = _scores(tiny, full=True)
    assert all(torch.equal(whole[n], again[n]) for n in whole)
    cands = _scores(tiny, max_k=4)  # built from the whole-tensor entry, nothing recomputed
    for kind in ("top", "bottom"):
        assert select(cands, 4, kind).keys() == select(whole, 4, kind).keys()
    assert cands.summary == esa.metrics.registry.score_summary(whole)
    assert _scores(tiny, metric="magnitude") is not None
    with pytest.raises(AssertionError, match="from the cache"):
        _scores(tiny, metric="magnitude", full=True)
    with pytest.raises(AssertionError, match="from the cache"):
        _scores(tiny, metric="magnitude", max_k=1000)


def test_whole_scores_above_the_cap_cache_candidates(tiny, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_MAX_BYTES", "100K")
    whole = _scores(tiny, full=True, max_k=2)
    (entry,) = cache_store.entries(cache_store.scores_dir())
    assert entry.bytes < 100 << 10 < sum(v.numel() * 4 for v in whole.values())
    assert cli_cache.describe(entry)["kind"] == "candidates"


def test_format_1_entry_is_read(tiny, monkeypatch):
    """Entries written before candidates (whole tensors under their names) still count."""
    from safetensors.torch import save_file

    whole = _scores(tiny, full=True)
    (entry,) = cache_store.entries(cache_store.scores_dir())
    key = json.loads(cache_store.read_header(entry.path)["__metadata__"]["esa_key"])
    save_file(
        {n: v.contiguous() for n, v in whole.items()}, str(entry.path), metadata={"esa_key": json.dumps(key)}
    )
    _forbid_compute(monkeypatch)
    assert all(torch.equal(v, whole[n]) for n, v in _scores(tiny, full=True).items())


# --- size cap, LRU, failed writes ----------------------------------------------------------------


def test_parse_bytes_and_cap(monkeypatch):
    assert [cache_store.parse_bytes(t) for t in ("1024", "2K", "1.5M", "2GiB", "1 gb")] == [
        1024,
        2048,
        3 << 19,
        2 << 30,
        1 << 30,
    ]
    with pytest.raises(ConfigError, match=r"e\.g\. 2G"):
        cache_store.parse_bytes("lots")
    assert cache_store.max_bytes() == cache_store.DEFAULT_MAX_BYTES
    monkeypatch.setenv("ESA_CACHE_MAX_BYTES", "3M")
    assert cache_store.max_bytes() == 3 << 20


def test_lru_eviction_under_the_cap(tmp_path, monkeypatch):
    """Writing past the cap removes the least recently used entries first; a read (touch)
    makes an entry recent; an entry above the cap is not written."""
    monkeypatch.setenv("ESA_CACHE_MAX_BYTES", "3000")
    folder = tmp_path / "scores"
    for i, name in enumerate(["a", "b", "c"]):
        assert cache_store.write(folder / f"{name}.safetensors", b"x" * 1000)
        os.utime(folder / f"{name}.safetensors", (time.time() - 100 + i, time.time() - 100 + i))
    cache_store.touch(folder / "a.safetensors")  # a is now the most recent
    assert cache_store.write(folder / "d.safetensors", b"x" * 1500)
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "d.safetensors"]
    assert not cache_store.write(folder / "e.safetensors", b"x" * 3001)
    assert not (folder / "e.safetensors").exists()


def test_whole_scores_are_streamed_within_their_stated_size(tmp_path, caplog):
    """A whole-score entry is written from the tensors (no bytes copy): the file is a loadable
    entry no larger than the size the cap and free-space checks used; a writer that fails leaves
    no file, warns one line and never raises."""
    from esa.metrics.cache import full_writer

    scores = {"layers.0.w": torch.randn(64, 32), "layers.1.w": torch.randn(7)}
    writer, size = full_writer({"k": 1}, scores)
    path = tmp_path / "scores" / "a.safetensors"
    assert cache_store.write(path, writer, size)
    data = sum(s.numel() * 4 for s in scores.values())
    assert data < path.stat().st_size <= size
    got = load_entry(path, {"k": 1}, {n: tuple(s.shape) for n, s in scores.items()}, full=True, cap=4, seed=0)
    assert all(torch.equal(got[n], scores[n]) for n in scores)

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    assert not cache_store.write(tmp_path / "scores" / "b.safetensors", broken, 10)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["a.safetensors"]
    (line,) = _warnings(caplog)
    assert "No space left on device" in line


def test_bad_cap_warns_and_never_raises(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ESA_CACHE_MAX_BYTES", "lots")
    assert not cache_store.write(tmp_path / "scores" / "a.safetensors", b"x")
    assert "ESA_CACHE_MAX_BYTES" not in str(cache_store.usage()) and cache_store.usage()["max_bytes"] is None
    (line,) = _warnings(caplog)
    assert "not a size" in line


# --- esa cache -----------------------------------------------------------------------------------


def _cache_cli(argv):
    parser = argparse.ArgumentParser(prog="esa")
    cli_cache.add_parser(parser.add_subparsers(dest="command"))
    return cli_cache.main(parser.parse_args(["cache", *argv]))


def test_cache_command_lists_and_clears(tiny, capsys):
    _scores(tiny)
    _scores(tiny, metric="magnitude", full=True)
    assert _cache_cli([]) == 0
    out = capsys.readouterr().out
    assert str(cache_store.scores_dir()) in out and "2 entries" in out and "of 2.0 GiB cap" in out
    assert "candidates" in out and "full" in out and "tiny-llama" in out and "magnitude" in out
    assert _cache_cli(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {e["metric"] for e in listed["entries"]} == {"grad_x_weight", "magnitude"}
    assert listed["bytes"] == sum(e["bytes"] for e in listed["entries"])
    old = next(
        e for e in cache_store.entries(cache_store.scores_dir()) if e.path.name.startswith("magnitude")
    )
    os.utime(old.path, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    assert _cache_cli(["clear", "--older-than", "2d"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert [e.path.name.split("-")[0] for e in cache_store.entries(cache_store.scores_dir())] == [
        "grad_x_weight"
    ]
    assert _cache_cli(["clear", "--all"]) == 0
    assert cache_store.entries(cache_store.scores_dir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["clear"], "say what to clear"),
        (["--all"], "go with clear"),
        (["clear", "--older-than", "soon"], "duration"),
    ],
)
def test_cache_command_bad_options(argv, message):
    with pytest.raises(ConfigError, match=message):
        _cache_cli(argv)


def test_entry_path_is_per_metric_and_key(tmp_path):
    a = entry_path(tmp_path, {"metric": "magnitude", "seed": 0})
    assert a.name.startswith("magnitude-") and a != entry_path(tmp_path, {"metric": "magnitude", "seed": 1})
