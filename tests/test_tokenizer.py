"""Tests for esa.models.tokenizer: the offline byte-level BPE used by the tiny-* models."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.models.tokenizer import BUILTIN_VOCAB_SIZE, _trained, builtin_corpus, builtin_tokenizer

SAMPLE = builtin_corpus()[:4000]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vocab_is_1024(tok):
    assert BUILTIN_VOCAB_SIZE == 1024
    assert len(tok) == 1024
    assert tok.vocab_size == 1024
    assert sorted(tok.get_vocab().values()) == list(range(1024))
    ids = _ids(tok, builtin_corpus()[:50_000])
    assert min(ids) >= 0 and max(ids) < 1024


def test_special_tokens_match_tiny_configs(tok):
    from esa.models.tiny import _COMMON

    assert tok.eos_token_id == _COMMON["eos_token_id"] == 0
    assert tok.bos_token_id == _COMMON["bos_token_id"] == 0
    assert tok.pad_token_id == _COMMON["pad_token_id"] == 1
    # Ordinary text never produces the special ids.
    ids = _ids(tok, SAMPLE)
    assert 0 not in ids and 1 not in ids


def test_cached_per_process(tok):
    assert builtin_tokenizer() is tok


def test_training_is_deterministic(tok):
    # A fresh training run (bypassing the lru_caches) gives the same vocabulary, merges and ids.
    trained = _trained.__wrapped__(BUILTIN_VOCAB_SIZE)
    assert trained is not _trained(BUILTIN_VOCAB_SIZE)
    assert trained.to_str() == _trained(BUILTIN_VOCAB_SIZE).to_str()
    fresh = builtin_tokenizer.__wrapped__()
    assert fresh is not tok
    assert fresh.get_vocab() == tok.get_vocab()
    assert fresh.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert _ids(fresh, SAMPLE) == _ids(tok, SAMPLE)


def test_same_ids_across_calls(tok):
    first = _ids(tok, SAMPLE)
    assert _ids(tok, SAMPLE) == first
    # It actually compresses the prose it was trained on (merges are used).
    assert len(first) < 0.5 * len(SAMPLE.encode("utf-8"))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_round_trips_any_text(text):
    tok = builtin_tokenizer()
    ids = _ids(tok, text)
    assert all(0 <= i < BUILTIN_VOCAB_SIZE for i in ids)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_round_trips_corpus_and_odd_text(tok):
    for text in (SAMPLE, "hello world .", " a , b", "héllo 😀\n\t x", "   ", "\x00\x7f"):
        assert tok.decode(_ids(tok, text), clean_up_tokenization_spaces=False) == text


def test_bos_variant_adds_bos_only_with_special_tokens(tok):
    """builtin_tokenizer(add_bos=True): the convention of BOS-adding tokenizers (Llama's)."""
    bos = builtin_tokenizer(add_bos=True)
    assert bos is builtin_tokenizer(add_bos=True) and bos.get_vocab() == tok.get_vocab()
    assert bos.add_bos_token is True and not tok.add_bos_token
    assert bos(SAMPLE[:300])["input_ids"] == [bos.bos_token_id, *_ids(tok, SAMPLE[:300])]
    assert _ids(bos, SAMPLE[:300]) == _ids(tok, SAMPLE[:300]) == tok(SAMPLE[:300])["input_ids"]
