"""Tests for esa.analyses.interpret on tiny-llama (code paths, not research claims): trace shapes and
values against direct computation, a planted activation peak is found at its layer, stop-word mass
is a probability, first-token attention shares are probabilities and the attention kernel is restored."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.analyses import interpret
from esa.errors import ConfigError
from esa.models import load_model
from esa.models.params import decoder_layers


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def ids(llama):
    vocab = llama.model.get_input_embeddings().weight.shape[0]
    return torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def scaled(param: torch.nn.Parameter, factor: float):
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.mul_(factor)
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_trace_shapes_and_embedding_max(llama, ids):
    tr = interpret.trace_activations(llama, ids)
    n = len(decoder_layers(llama.model))
    assert tr.down_max.shape == (3, n) and tr.resid_max.shape == (3, n + 1)
    emb = llama.model.get_input_embeddings()(ids).detach().float().abs().amax(dim=(1, 2))
    np.testing.assert_allclose(tr.resid_max[:, 0], emb.numpy(), rtol=1e-6)
    assert np.array_equal(tr.down_token, np.take_along_axis(ids.numpy(), tr.down_pos, axis=1))
    summary = tr.summary()
    assert len(summary["down_max"]) == n and isinstance(summary["peak_layer"], int)


@pytest.mark.parametrize("layer", [0, 1])
def test_trace_finds_planted_peak(llama, ids, layer):
    up = dict(llama.model.named_parameters())[f"model.layers.{layer}.mlp.up_proj.weight"]
    with scaled(up, 1e4):
        tr = interpret.trace_activations(llama, ids)
    assert tr.peak_layer() == layer


def test_stopword_mass_is_probability(llama, ids):
    vocab = llama.model.get_input_embeddings().weight.shape[0]
    some = interpret.stopword_mass(llama, ids, [0, 1, 2], batch_size=2)
    assert some.shape == (3,) and ((some >= 0) & (some <= 1)).all()
    np.testing.assert_allclose(interpret.stopword_mass(llama, ids, range(vocab)), 1.0, rtol=1e-5)


class _Tok:
    """A tokenizer stand-in: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(alphabet="abc", min_size=0, max_size=3), max_size=6))
def test_stopword_ids_single_tokens_only(words):
    # " w" is one token only for the empty word (just the space)
    if "" in words:
        assert interpret.stopword_ids(_Tok(), words) == [ord(" ")]
    else:
        with pytest.raises(ConfigError):
            interpret.stopword_ids(_Tok(), words)


def test_stopword_ids_accepts_space_separated_string():
    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(text)]}

    assert interpret.stopword_ids(Words(), "a bb ccc") == [2, 3, 4]


def test_first_token_attention(llama, ids):
    before = llama.model.config._attn_implementation
    share = interpret.first_token_attention(llama, ids[:2])
    n = len(decoder_layers(llama.model))
    assert share.shape[0] == n and share.ndim == 2
    assert ((share >= 0) & (share <= 1 + 1e-6)).all()
    assert llama.model.config._attn_implementation == before


def test_bad_windows_rejected(llama):
    with pytest.raises(ConfigError):
        interpret.first_token_attention(llama, torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(ConfigError):
        interpret.trace_activations(llama, torch.zeros((0, 4), dtype=torch.long))


def test_plots(llama, ids):
    tr = interpret.trace_activations(llama, ids)
    assert interpret.plot_trace(tr, tr, 1).axes
    assert interpret.plot_attention(np.full((2, 3), 0.5), 0).axes
