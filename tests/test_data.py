"""Tests for esa.data: text loading, the windows protocol, calibration sampling and the manifest."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data import (
    BOS_MODES,
    MAX_CALIB_OVERLAP,
    DataBundle,
    adds_bos,
    bos_policy,
    default_data_file,
    load_text,
    make_windows,
    prepare_data,
    tokenize,
    windows_of,
)
from esa.errors import ConfigError, DataError
from esa.models.tokenizer import builtin_corpus, builtin_tokenizer
from esa.util.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
CORPUS = builtin_corpus()
TEXT = CORPUS[:30_000]  # natural prose: no two 32-token windows are identical
L = 32


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def all_windows(tok):
    return make_windows(tok, TEXT, L)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


# --------------------------------------------------------------------------- windows


@settings(max_examples=40, deadline=None)
@given(n_chars=st.integers(0, 3000), max_length=st.integers(1, 80))
def test_windows_are_consecutive_and_drop_remainder(n_chars, max_length):
    tok = builtin_tokenizer()
    text = CORPUS[:n_chars]
    ids = tokenize(tok, text)
    w = make_windows(tok, text, max_length)
    n = ids.numel() // max_length
    assert w.dtype == torch.long
    assert tuple(w.shape) == (n, max_length)
    assert torch.equal(w.reshape(-1), ids[: n * max_length])
    # The dropped remainder is shorter than one window.
    assert ids.numel() - n * max_length < max_length


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 500), max_length=st.integers(1, 64))
def test_windows_of_is_a_reshape(n, max_length):
    ids = torch.arange(n, dtype=torch.long) * 7 + 3
    w = windows_of(ids, max_length)
    assert w.shape == (n // max_length, max_length)
    for i in range(w.shape[0]):  # window i is exactly ids[i*L:(i+1)*L]: consecutive, non-overlapping
        assert torch.equal(w[i], ids[i * max_length : (i + 1) * max_length])


def test_tokenize_adds_no_special_tokens(tok):
    ids = tokenize(tok, "hello world")
    assert ids.tolist() == tok("hello world", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids.tolist()
    assert tokenize(tok, "").numel() == 0


# --------------------------------------------------------------------------- load_text


def test_load_text_none_is_builtin_without_file():
    src = load_text(None)
    assert src.text == CORPUS
    assert src.path is None
    assert src.name.startswith("builtin")
    assert src.sha256 == hashlib.sha256(CORPUS.encode("utf-8")).hexdigest()
    assert load_text("builtin") == src
    assert src.describe() == {"name": src.name, "path": None, "sha256": src.sha256, "chars": len(CORPUS)}


def test_load_text_file(text_file):
    src = load_text(str(text_file))
    assert src.text == TEXT
    assert src.path == str(text_file.resolve())
    assert src.sha256 == hashlib.sha256(text_file.read_bytes()).hexdigest() == file_sha256(text_file)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_file(tmp_path, tok, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_text(str(path))
    with pytest.raises(DataError):
        prepare_data(tok, str(path), max_length=8)


def test_non_utf8_file(tmp_path, tok):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 50 + b"\xff\xfe")
    with pytest.raises(DataError, match="UTF-8"):
        load_text(str(path))
    with pytest.raises(DataError, match="UTF-8"):
        prepare_data(tok, str(path), max_length=8)


def test_too_short_file_names_max_length(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("A few words only.")
    n_tok = tokenize(tok, "A few words only.").numel()
    with pytest.raises(DataError, match="--max-length") as info:
        prepare_data(tok, str(path), max_length=n_tok + 1)
    assert str(n_tok) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_max_length_below_two(tok, text_file, max_length):
    with pytest.raises(DataError, match="--max-length"):
        prepare_data(tok, str(text_file), max_length=max_length)


# --------------------------------------------------------------------------- prepare_data


def test_eval_is_first_windows_and_calibration_is_the_rest(tok, text_file, all_windows):
    assert all_windows.shape[0] > 20
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=5)
    assert isinstance(b, DataBundle)
    assert torch.equal(b.eval_ids, all_windows[:5])
    assert torch.equal(b.calib_pool, all_windows[5:])
    assert b.eval_total_windows == all_windows.shape[0]
    # No evaluation window appears in the calibration pool (natural text: windows are unique).
    assert len(_rows(all_windows)) == all_windows.shape[0]
    assert not _rows(b.eval_ids) & _rows(b.calib_pool)
    for seed in range(5):
        assert not _rows(b.eval_ids) & _rows(b.calibration(8, seed))


def test_calibration_seeded(tok, text_file):
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=4)
    a1, a2, c = b.calibration(6, seed=1), b.calibration(6, seed=1), b.calibration(6, seed=2)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, c)
    pool = _rows(b.calib_pool)
    for s in (a1, c):
        assert s.shape == (6, L)
        assert len(_rows(s)) == 6  # without replacement
        assert _rows(s) <= pool
    # Asking for more than half the pool is refused: seeds would share most of their windows.
    pool = b.calib_pool.shape[0]
    assert b.calibration(pool // 2, seed=3).shape[0] == pool // 2
    with pytest.raises(DataError, match=f"at most {pool // 2}"):
        b.calibration(pool // 2 + 1, seed=3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 10))
def test_calibration_property(seed, n):
    pool = torch.arange(20 * 4).view(20, 4)
    b = DataBundle(pool[:0], pool, None, None, 4, 0)
    s = b.calibration(n, seed)
    assert torch.equal(s, b.calibration(n, seed))
    firsts = s[:, 0].tolist()
    assert firsts == sorted(set(firsts)) and len(firsts) == n  # distinct pool rows, in pool order
    assert all(torch.equal(row, pool[row[0] // 4]) for row in s)


def test_different_seeds_give_different_samples(tok, text_file):
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=4)
    samples = {tuple(b.calibration(4, seed).reshape(-1).tolist()) for seed in range(6)}
    assert len(samples) >= 5


def test_max_samples_none_uses_all_and_needs_calib(tok, text_file, all_windows):
    with pytest.raises(DataError, match="calib"):
        prepare_data(tok, str(text_file), max_length=L)
    b = prepare_data(tok, str(text_file), max_length=L, min_calib_windows=0)
    assert torch.equal(b.eval_ids, all_windows)
    assert b.calib_pool.shape[0] == 0


def test_max_samples_beyond_text_warns(tok, text_file, all_windows, caplog):
    with caplog.at_level(logging.WARNING, logger="esa"):
        b = prepare_data(tok, str(text_file), max_length=L, max_samples=10_000, min_calib_windows=0)
    assert b.eval_ids.shape[0] == all_windows.shape[0]
    assert any("only" in r.getMessage() for r in caplog.records)


def test_separate_calibration_file(tok, text_file, tmp_path):
    calib = tmp_path / "calib.txt"
    calib_text = CORPUS[40_000:50_000]
    calib.write_text(calib_text, encoding="utf-8")
    b = prepare_data(tok, str(text_file), calib_data=str(calib), max_length=L, max_samples=3)
    assert torch.equal(b.calib_pool, make_windows(tok, calib_text, L))
    m = b.manifest()
    assert m["calibration"]["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert m["calibration"]["windows_pool"] == b.calib_pool.shape[0]
    assert "after the evaluation" not in m["protocol"]
    assert m["calibration_disjoint"] is True and m["calibration"]["from"] == "a separate text"


def test_manifest(tok, text_file, all_windows):
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=7)
    m = b.manifest()
    json.dumps(m)  # plain types only
    digest = hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert m["max_length"] == L
    assert m["eval"]["sha256"] == digest
    assert m["eval"]["path"] == str(text_file.resolve())
    assert m["eval"]["windows_total"] == all_windows.shape[0]
    assert m["eval"]["windows_used"] == 7
    assert m["calibration"]["sha256"] == digest
    assert m["calibration"]["windows_pool"] == all_windows.shape[0] - 7
    assert "after the evaluation" in m["protocol"]
    assert m["eval"]["chars"] == len(TEXT)
    assert m["calibration_disjoint"] is True
    assert m["calibration"]["from"] == "windows after the evaluation ones"


def test_builtin_data_when_no_file(tok):
    b = prepare_data(tok, None, max_length=64, max_samples=2)
    expected = make_windows(tok, CORPUS, 64)
    assert torch.equal(b.eval_ids, expected[:2])
    assert b.manifest()["eval"]["path"] is None


# --------------------------------------------------------------------------- defaults, overlap


def test_default_data_files(tmp_path):
    assert default_data_file("test", tmp_path) is None and default_data_file("validation", tmp_path) is None
    root = tmp_path / "project"
    root.mkdir()
    for split, rel in {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2/valid.txt"}.items():
        path = tmp_path / "shared" / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("text")
        assert default_data_file(split, root) == path.resolve()
    with pytest.raises(DataError, match="test, validation"):
        default_data_file("train", root)


def test_same_text_for_calibration_uses_the_windows_after_evaluation(tok, text_file, all_windows):
    b = prepare_data(tok, str(text_file), calib_data=str(text_file), max_length=L, max_samples=5)
    assert torch.equal(b.calib_pool, all_windows[5:])
    assert b.manifest()["calibration_disjoint"] is True and not _rows(b.eval_ids) & _rows(b.calib_pool)


def test_calibration_text_containing_the_evaluation_text_is_not_disjoint(tok, text_file, tmp_path):
    both = tmp_path / "both.txt"
    both.write_text(CORPUS[40_000:45_000] + TEXT, encoding="utf-8")
    m = prepare_data(tok, str(text_file), calib_data=str(both), max_length=L, max_samples=3).manifest()
    assert m["calibration_disjoint"] is False and m["calibration"]["from"] == "a separate text"


def test_a_tiny_pool_is_refused(tok, text_file, all_windows):
    n_eval = all_windows.shape[0] - 6  # 6 calibration windows left
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=n_eval, calib_windows=3)
    assert b.calibration_overlap(3, [0, 1, 2])["expected_overlap"] == 0.5
    with pytest.raises(DataError, match="--calib-samples") as info:
        prepare_data(tok, str(text_file), max_length=L, max_samples=n_eval, calib_windows=4)
    assert "\n" not in str(info.value) and "at most 3" in str(info.value)
    with pytest.raises(DataError, match="67%"):
        b.calibration_overlap(4, [0, 1])


@settings(max_examples=25, deadline=None)
@given(pool=st.integers(1, 60), n=st.integers(1, 60), seeds=st.lists(st.integers(0, 10**6), max_size=5))
def test_calibration_overlap_property(pool, n, seeds):
    ids = torch.arange(pool * 2).view(pool, 2)
    b = DataBundle(ids[:0], ids, None, None, 2, 0)
    if n > MAX_CALIB_OVERLAP * pool:
        with pytest.raises(DataError):
            b.calibration_overlap(n, seeds)
        return
    o = b.calibration_overlap(n, seeds)
    assert 0.0 <= o["mean_jaccard"] <= o["max_jaccard"] <= 1.0
    assert o["expected_overlap"] == n / pool and o["n"] == n and o["pool"] == pool
    assert all(type(o[key]) is float for key in ("mean_jaccard", "max_jaccard", "expected_overlap"))
    if len(set(seeds)) < len(seeds):  # a repeated seed draws the same set
        assert o["max_jaccard"] == 1.0


def test_seeds_draw_nearly_disjoint_sets_from_wikitext_valid(tok):
    valid = default_data_file("validation", ROOT)
    if valid is None:
        pytest.skip("../shared/data/wikitext-2/valid.txt is absent")
    b = prepare_data(tok, None, calib_data=str(valid), max_length=128, max_samples=8, calib_windows=4)
    o = b.calibration_overlap(4, [0, 1, 2])
    assert o["pool"] > 1000 and o["max_jaccard"] < 0.2 and o["mean_jaccard"] < 0.05
    assert b.manifest()["calibration_disjoint"] is True


# --------------------------------------------------------------------------- BOS (the tokenizer's convention)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), max_length=st.integers(2, 64), bos=st.integers(0, 5))
def test_bos_windows_are_bos_then_consecutive_text(n, max_length, bos):
    ids = torch.arange(n, dtype=torch.long) * 7 + 10
    w = windows_of(ids, max_length, bos)
    body = max_length - 1  # text tokens per window after the BOS
    assert w.shape == (n // body, max_length) and w.dtype == torch.long
    assert bool((w[:, 0] == bos).all())
    assert torch.equal(w[:, 1:].reshape(-1), ids[: (n // body) * body])  # consecutive, none skipped


def test_saved_bos_tokenizer_is_detected_by_what_it_does(tmp_path):
    """A reloaded tokenizer.json adds BOS through its post-processor, whatever add_bos_token says."""
    from transformers import AutoTokenizer

    builtin_tokenizer(add_bos=True).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("a")["input_ids"][0] == reloaded.bos_token_id == 0
    assert adds_bos(reloaded) and adds_bos(builtin_tokenizer(add_bos=True))
    assert not adds_bos(builtin_tokenizer())


@pytest.mark.parametrize(
    "add_bos,mode,prepended",
    [(False, "auto", False), (True, "auto", True), (True, "never", False), (False, "always", True)],
)
def test_bos_policy(add_bos, mode, prepended):
    p = bos_policy(builtin_tokenizer(add_bos=add_bos), mode)
    json.dumps(p)  # plain types for the manifest
    assert p["mode"] == mode and p["prepended"] is prepended
    assert p["token_id"] == (0 if prepended else None) and p["token"] == (
        "<|endoftext|>" if prepended else None
    )


def test_bos_policy_errors(tok):
    with pytest.raises(ConfigError, match="auto, always, never"):
        bos_policy(tok, "sometimes")
    no_bos = type("NoBos", (), {"bos_token_id": None, "bos_token": None})()
    with pytest.raises(DataError, match="--bos never") as info:
        bos_policy(no_bos, "always")
    assert "\n" not in str(info.value)
    assert bos_policy(no_bos, "auto")["prepended"] is False and BOS_MODES == ("auto", "always", "never")


def test_prepare_data_with_bos(text_file, tmp_path):
    bos_tok = builtin_tokenizer(add_bos=True)
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS[40_000:60_000], encoding="utf-8")
    b = prepare_data(bos_tok, str(text_file), calib_data=str(calib), max_length=L, max_samples=5)
    plain = tokenize(bos_tok, TEXT)
    assert b.eval_ids.shape == (5, L) and bool((b.eval_ids[:, 0] == 0).all())
    assert torch.equal(b.eval_ids[:, 1:].reshape(-1), plain[: 5 * (L - 1)])
    assert bool((b.calib_pool[:, 0] == 0).all()) and b.eval_total_windows == plain.numel() // (L - 1)
    m = b.manifest()
    assert m["bos"] == b.bos and m["bos"]["prepended"] and "BOS (id 0, input only" in m["protocol"]
    never = prepare_data(bos_tok, str(text_file), max_length=L, max_samples=5, bos="never")
    assert torch.equal(never.eval_ids, make_windows(bos_tok, TEXT, L)[:5])
    assert never.manifest()["bos"]["prepended"] is False and "BOS" not in never.manifest()["protocol"]


def test_no_bos_tokenizer_keeps_the_plain_protocol(tok, text_file, all_windows):
    """Tokenizers that add no BOS (the builtin, SmolLM2's): auto gives exactly the old windows."""
    b = prepare_data(tok, str(text_file), max_length=L, max_samples=5)
    assert torch.equal(b.eval_ids, all_windows[:5]) and b.bos["prepended"] is False
    assert b.bos["reason"] == "tokenizer adds no BOS"


def test_too_short_for_one_bos_window(tmp_path):
    bos_tok = builtin_tokenizer(add_bos=True)
    path = tmp_path / "short.txt"
    path.write_text("A few words only.")
    n_tok = tokenize(bos_tok, "A few words only.").numel()
    one = prepare_data(bos_tok, str(path), max_length=n_tok + 1, min_calib_windows=0)  # BOS + all text
    assert one.eval_ids.shape == (1, n_tok + 1)
    with pytest.raises(DataError, match=r"\(BOS \+ text\)") as info:  # would need n_tok + 1 text tokens
        prepare_data(bos_tok, str(path), max_length=n_tok + 2, min_calib_windows=0)
    assert str(n_tok) in str(info.value)
    with pytest.raises(DataError, match="--max-length"):
        prepare_data(bos_tok, str(path), max_length=n_tok + 1, min_calib_windows=0, bos="never")


def test_claims_workbench_windows_follow_esa_bos(text_file):
    """--esa-bos reaches the claims: the workbench prepares every model's windows with it."""
    from esa.claims.tiers import get_tier
    from esa.claims.workbench import Workbench

    for mode, prepended in (("always", True), ("auto", False)):
        wb = Workbench(get_tier("smoke"), device="cpu", data=str(text_file), bos=mode)
        m = wb.data_manifest("tiny-llama")
        assert m["bos"]["mode"] == mode and m["bos"]["prepended"] is prepended
        assert bool((wb.data("tiny-llama").eval_ids[:, 0] == 0).all()) is prepended


WRITERS = {
    ".parquet": lambda frame, path: frame.to_parquet(path),
    ".jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    ".csv": lambda frame, path: frame.to_csv(path, index=False),
}


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_local_copies_in_datasets_formats_load_through_datasets(tmp_path, suffix):
    import pandas as pd

    rows = pd.DataFrame({"text": [" = Title = ", "", "First paragraph, plain words.", "Second one."]})
    WRITERS[suffix](rows, tmp_path / f"wiki{suffix}")
    src = load_text(tmp_path / f"wiki{suffix}")
    assert src.text.split("\n\n") == [t for t in rows["text"] if t]
    assert src.sha256 == file_sha256(tmp_path / f"wiki{suffix}")
    WRITERS[suffix](rows.rename(columns={"text": "body"}), tmp_path / f"bad{suffix}")
    with pytest.raises(DataError, match="no 'text' column"):
        load_text(tmp_path / f"bad{suffix}")
