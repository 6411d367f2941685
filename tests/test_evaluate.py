"""Tests for esa.evaluate: perplexity / accuracy against independent computations, batch-size
invariance, non-finite handling, token counts and the leak guard."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data import load_text, make_windows, prepare_data
from esa.evaluate import (
    LEAK_PPL,
    EvalResult,
    SuspiciousPerplexityWarning,
    _logsumexp_,
    evaluate,
    lm_loss,
    token_nll,
)
from esa.models import load_model

TEXT = load_text(None).text[:20_000]
REPEATED = "the quick brown fox jumps over the lazy dog. " * 400


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tiny_windows(tiny):
    return make_windows(tiny.tokenizer, TEXT, 32)[:5]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


# --------------------------------------------------------------------------- independent references


def reference_ppl(model, windows) -> float:
    """exp of the token-weighted mean of transformers' own per-window loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            loss = model(w[None], labels=w[None], use_cache=False).loss
            total += float(loss) * (w.numel() - 1)
            count += w.numel() - 1
    return math.exp(total / count)


def reference_hits(model, windows) -> tuple[int, int]:
    """(argmax hits, positions whose top-2 logits are within 1e-5: the only ones allowed to differ)."""
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, :-1].float()
    top2 = logits.topk(2, dim=-1).values
    near_ties = int(((top2[..., 0] - top2[..., 1]) < 1e-5).sum())
    return int((logits.argmax(-1) == windows[:, 1:]).sum()), near_ties


def greedy_windows(model, n=4, prefix=12, length=24, seed=0):
    """Random prefixes continued greedily by ``model``: about half the positions are argmax hits."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (n, prefix), generator=gen)
    with torch.no_grad():
        while ids.shape[1] < length:
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


class _Body(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(vocab))  # hidden state = one-hot of the input

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.embed_tokens(input_ids))


class SuccessorLM(torch.nn.Module):
    """Predicts token (i + 1) % V after token i with logit ``sharpness`` (0 for all others), so its
    NLL has a closed form: log(e^s + V - 1) - s on a successor, log(e^s + V - 1) otherwise."""

    def __init__(self, vocab=16, sharpness=20.0, softcap=None):
        super().__init__()
        self.model = _Body(vocab)
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for i in range(vocab):
                self.lm_head.weight[(i + 1) % vocab, i] = sharpness
        self.config = SimpleNamespace(final_logit_softcapping=softcap)
        self.vocab = vocab

    @property
    def base_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


# --------------------------------------------------------------------------- tiny-llama


def test_ppl_matches_transformers_loss_tiny(tiny, tiny_windows):
    r = evaluate(tiny.model, tiny_windows, progress=False)
    expected = reference_ppl(tiny.model, tiny_windows)
    assert r.ppl == pytest.approx(expected, rel=1e-4)
    assert r.nll == pytest.approx(math.log(expected), rel=1e-4)
    assert r.finite and r.nonfinite_tokens == 0
    # Random init: about uniform over the 1024-token vocabulary.
    assert 500 < r.ppl < 2000


def test_accuracy_matches_manual_argmax_tiny(tiny):
    windows = greedy_windows(tiny.model)
    r = evaluate(tiny.model, windows, progress=False)
    hits, near_ties = reference_hits(tiny.model, windows)
    n = windows.shape[0] * (windows.shape[1] - 1)
    assert hits >= windows.shape[0] * (windows.shape[1] - 12) - near_ties  # greedy part predicted
    assert abs(r.accuracy * n - hits) <= near_ties
    assert 0.3 < r.accuracy < 0.9


@settings(max_examples=10, deadline=None)
@given(batch_size=st.integers(1, 5))
def test_batch_size_does_not_change_ppl(tiny, tiny_windows, batch_size):
    ref = evaluate(tiny.model, tiny_windows, batch_size=8, progress=False)
    r = evaluate(tiny.model, tiny_windows, batch_size=batch_size, progress=False)
    assert r.ppl == pytest.approx(ref.ppl, rel=1e-5)
    assert r.window_nll == pytest.approx(ref.window_nll, rel=1e-5)
    assert r.n_tokens == ref.n_tokens and r.n_windows == ref.n_windows


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), length=st.integers(2, 20))
def test_token_counts(tiny, n, length):
    windows = torch.randint(2, 1024, (n, length), generator=torch.Generator().manual_seed(n * 100 + length))
    r = evaluate(tiny.model, windows, batch_size=3, progress=False)
    assert r.n_tokens == n * (length - 1)
    assert r.n_windows == n and len(r.window_nll) == n
    assert r.nll == pytest.approx(sum(r.window_nll) / n, rel=1e-9)  # equal-length windows
    assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)
    assert r.seconds > 0 and r.tokens_per_s > 0 and r.peak_memory_bytes > 0


def test_token_nll_shapes(tiny, tiny_windows):
    nll, hits = token_nll(tiny.model, tiny_windows[:2])
    assert nll.shape == hits.shape == (2, 31)
    assert nll.dtype == torch.float32 and hits.dtype == torch.bool
    assert (nll > 0).all()


def test_lm_loss_is_the_differentiable_mean(tiny, tiny_windows):
    batch = tiny_windows[:2]
    loss = lm_loss(tiny.model, batch)
    with torch.no_grad():
        expected = tiny.model(batch, labels=batch, use_cache=False).loss
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    tiny.model.zero_grad(set_to_none=True)
    loss.backward()
    grad = tiny.model.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.model.zero_grad(set_to_none=True)


def test_nan_weights_give_nan_ppl_not_dropped(tiny_windows):
    lm = load_model("tiny-llama", device="cpu")
    w = tiny_windows[:2]
    only_second = sorted(set(w[1].tolist()) - set(w[0].tolist()))
    assert only_second
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[only_second[0]] = float("nan")
    r = evaluate(lm.model, w, batch_size=1, progress=False)
    assert math.isfinite(r.window_nll[0])  # the clean window is fine ...
    assert math.isnan(r.window_nll[1])
    assert math.isnan(r.ppl) and math.isnan(r.nll)  # ... but the NaN one is not dropped
    assert r.finite is False
    assert r.nonfinite_tokens > 0
    assert r.n_tokens == 2 * (w.shape[1] - 1)
    d = r.to_dict()
    assert math.isnan(d["ppl"]) and d["finite"] is False and "window_nll" not in d
    assert isinstance(d["n_tokens"], int) and isinstance(d["ppl"], float)
    assert len(r.to_dict(with_windows=True)["window_nll"]) == 2


def test_nan_lm_head_everywhere(tiny_windows):
    lm = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        lm.model.lm_head.weight[7, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SuspiciousPerplexityWarning)
        r = evaluate(lm.model, tiny_windows[:2], progress=False, check_leak=True)
    assert math.isnan(r.ppl) and not r.finite
    assert r.nonfinite_tokens == r.n_tokens
    assert all(math.isnan(v) for v in r.window_nll)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(5, dtype=torch.long),
        torch.zeros(3, 1, dtype=torch.long),
        torch.zeros(2, 3, 4, dtype=torch.long),
    ],
)
def test_bad_window_shapes(bad):
    with pytest.raises(ValueError, match="L >= 2"):
        evaluate(SuccessorLM(), bad, progress=False)


def test_zero_windows_is_a_value_error():
    with pytest.raises(ValueError):
        evaluate(SuccessorLM(), torch.zeros(0, 8, dtype=torch.long), progress=False)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    special=st.lists(st.sampled_from([math.inf, -math.inf, math.nan, 1e38, -1e38]), max_size=6),
)
def test_inplace_logsumexp_is_bit_identical_to_torch(rows, cols, seed, special):
    """The evaluation's in-place logsumexp gives torch.logsumexp's bits, non-finite rows included."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 30
    for j, value in enumerate(special):
        x[j % rows, (j * 7) % cols] = value
    expected = torch.logsumexp(x, dim=-1)
    got = _logsumexp_(x.clone())
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


# --------------------------------------------------------------------------- closed form + leak guard


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    sharpness=st.floats(0.5, 12.0),
    softcap=st.sampled_from([None, 5.0, 30.0]),
    batch_size=st.integers(1, 4),
)
def test_closed_form_nll_and_accuracy(data, sharpness, softcap, batch_size):
    vocab = 16
    n = data.draw(st.integers(1, 4))
    length = data.draw(st.integers(2, 12))
    flat = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n * length, max_size=n * length))
    windows = torch.tensor(flat).view(n, length)
    model = SuccessorLM(vocab, sharpness, softcap)
    r = evaluate(model, windows, batch_size=batch_size, progress=False)
    s = softcap * math.tanh(sharpness / softcap) if softcap else sharpness
    log_z = math.log(math.exp(s) + vocab - 1)
    successor = (windows[:, :-1] + 1) % vocab == windows[:, 1:]
    k, total = int(successor.sum()), n * (length - 1)
    expected_nll = (k * (log_z - s) + (total - k) * log_z) / total
    assert r.nll == pytest.approx(expected_nll, rel=1e-5, abs=1e-6)
    assert r.ppl == pytest.approx(math.exp(expected_nll), rel=1e-5)
    assert r.accuracy == k / total
    assert r.n_tokens == total


def test_leak_guard_fires_on_a_copying_model():
    model = SuccessorLM(16, sharpness=20.0)
    windows = (torch.arange(4 * 40) % 16).view(4, 40)  # every next token is predictable
    with pytest.warns(SuspiciousPerplexityWarning, match="perplexity"):
        r = evaluate(model, windows, progress=False, check_leak=True)
    assert r.ppl < 1.0001 and r.accuracy == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SuspiciousPerplexityWarning)
        evaluate(model, windows, progress=False)  # check_leak defaults to off
        # A uniform model: PPL = V = 16 exactly, no warning.
        r = evaluate(SuccessorLM(16, sharpness=0.0), windows, progress=False, check_leak=True)
    assert r.ppl == pytest.approx(16.0, rel=1e-6)


def test_leak_threshold_boundary():
    # Solve for the sharpness giving PPL just above / below LEAK_PPL on all-successor windows.
    vocab = 16
    windows = (torch.arange(2 * 20) % vocab).view(2, 20)
    # ppl = (e^s + V - 1) / e^s  =>  s = log((V - 1) / (ppl - 1))
    for target, fires in ((LEAK_PPL * 1.01, False), (LEAK_PPL * 0.99, True)):
        s = math.log((vocab - 1) / (target - 1))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            r = evaluate(SuccessorLM(vocab, s), windows, progress=False, check_leak=True)
        assert r.ppl == pytest.approx(target, rel=1e-5)
        assert any(issubclass(w.category, SuspiciousPerplexityWarning) for w in rec) is fires


# --------------------------------------------------------------------------- BOS: evaluated as trained


def plain_bos_ppl(model, ids: list[int], length: int, n: int) -> float:
    """A hand-written transformers loop over ``ids`` = [BOS, text tokens ...]: the text cut into n
    chunks of ``length - 1``, each evaluated as ``[BOS] + chunk`` with labels ``[-100] + chunk``
    (BOS is context, never a target); exp of the token-weighted mean of transformers' own loss."""
    bos, body = ids[0], ids[1:]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            chunk = body[i * (length - 1) : (i + 1) * (length - 1)]
            inputs = torch.tensor([[bos, *chunk]])
            labels = torch.tensor([[-100, *chunk]])
            loss = model(input_ids=inputs, labels=labels, use_cache=False).loss
            total += float(loss) * len(chunk)
            count += len(chunk)
    return math.exp(total / count)


def test_bos_model_matches_plain_transformers_with_bos(tiny):
    """A tiny random-init Llama whose tokenizer adds BOS (add_bos_token=True): esa's perplexity
    with BOS (bos="auto") is the plain transformers computation with BOS within 0.1%."""
    from esa.models.tokenizer import builtin_tokenizer

    bos_tok = builtin_tokenizer(add_bos=True)
    data = prepare_data(bos_tok, None, max_length=32, max_samples=4)
    assert data.bos["prepended"] and bool((data.eval_ids[:, 0] == bos_tok.bos_token_id).all())
    r = evaluate(tiny.model, data.eval_ids, batch_size=2, progress=False)
    assert r.n_tokens == 4 * 31  # every text token after the BOS, never the BOS
    ids = bos_tok(TEXT)["input_ids"]  # as the tokenizer itself does it: its BOS first
    assert ids[0] == bos_tok.bos_token_id
    assert r.ppl == pytest.approx(plain_bos_ppl(tiny.model, ids, 32, 4), rel=1e-3)
    never = prepare_data(bos_tok, None, max_length=32, max_samples=4, bos="never")
    without = evaluate(tiny.model, never.eval_ids, progress=False)
    assert without.ppl != r.ppl


# --------------------------------------------------------------------------- smollm2-135m (real weights)


def test_smollm2_with_bos_always_matches_plain_transformers(smollm2):
    """Real weights: --bos always (SmolLM2's tokenizer adds none by itself) gives the plain
    transformers perplexity of the same [BOS] + text windows within 0.1%."""
    tok = smollm2.tokenizer
    data = prepare_data(tok, None, max_length=64, max_samples=2, bos="always")
    r = evaluate(smollm2.model, data.eval_ids, batch_size=2, progress=False)
    assert data.bos["prepended"] and r.n_tokens == 2 * 63
    ids = [tok.bos_token_id, *tok(TEXT, add_special_tokens=False)["input_ids"]]
    plain = plain_bos_ppl(smollm2.model, ids, 64, 2)
    assert r.ppl == pytest.approx(plain, rel=1e-3)


def test_smollm2_ppl_and_accuracy_match_independent(smollm2):
    windows = make_windows(smollm2.tokenizer, TEXT, 64)[:2]
    assert windows.shape == (2, 64)
    r = evaluate(smollm2.model, windows, batch_size=2, progress=False)
    assert r.ppl == pytest.approx(reference_ppl(smollm2.model, windows), rel=1e-4)
    hits, near_ties = reference_hits(smollm2.model, windows)
    assert abs(r.accuracy * r.n_tokens - hits) <= near_ties
    assert r.n_tokens == 2 * 63
    # Real weights on English prose: far below the 49152-token vocabulary, and mostly right.
    assert 5 < r.ppl < 100
    assert r.accuracy > 0.2


def test_smollm2_repeated_text_triggers_leak_guard(smollm2):
    # Measured: 2 windows x 64 tokens of this text give PPL ~2.9 (too little context to copy from);
    # one window of 256 tokens gives ~1.35, below LEAK_PPL.
    windows = make_windows(smollm2.tokenizer, REPEATED, 256)[:1]
    with pytest.warns(SuspiciousPerplexityWarning):
        r = evaluate(smollm2.model, windows, progress=False, check_leak=True)
    assert r.finite and r.ppl < LEAK_PPL


def test_eval_result_to_dict_plain_types():
    r = EvalResult(
        ppl=float("inf"),
        nll=float("inf"),
        accuracy=0.0,
        n_tokens=3,
        n_windows=1,
        tokens_per_s=1.0,
        seconds=1.0,
        peak_memory_bytes=1,
        finite=False,
        window_nll=[1.0],
    )
    d = r.to_dict()
    assert d["ppl"] == math.inf and set(d) == {
        "ppl",
        "nll",
        "accuracy",
        "n_tokens",
        "n_windows",
        "tokens_per_s",
        "seconds",
        "peak_memory_bytes",
        "finite",
        "nonfinite_tokens",
    }
