"""Tests for esa.models.gguf: any GGUF transformers can dequantize, cached by the file's sha256.

The GGUF files are written here with the gguf package (``GGUFWriter``) from tiny random-init
Llama models (tied and untied embeddings, with and without a BOS-adding tokenizer), exactly as
llama.cpp's converter lays them out (q/k rows permuted for its rotary layout), in float32 so the
round trip must be bit-exact. Nothing touches the network.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("gguf")

import esa.models.gguf as gg
from esa.bench.random_gguf import write_llama_gguf
from esa.cli import main
from esa.data import adds_bos, make_windows, prepare_data
from esa.errors import ModelError
from esa.evaluate import evaluate
from esa.models import load_model, weights_sha256
from esa.models.tokenizer import builtin_corpus, builtin_tokenizer

TEXT = builtin_corpus()[:12_000]
L = 32


def tiny_llama(tied: bool, seed: int = 3):
    """A random-init tiny Llama (GQA) with tied or untied embeddings."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from esa.util.runtime import seeded

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=tied,
    )
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh esa cache, and a counter of the (slow) dequantizations."""
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    original = gg.dequantize

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(gg, "dequantize", counting)
    return calls


def _ppl(model, windows) -> float:
    return evaluate(model, windows, batch_size=4, progress=False).ppl


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_loads_then_hits_the_cache_with_equal_ppl(tied, tmp_path, cache):
    src = tiny_llama(tied)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(src, builtin_tokenizer(), path)
    first = load_model(str(path), device="cpu")
    second = load_model(str(path), device="cpu")
    assert len(cache) == 1  # the second load read the dequantized cache
    key = gg.cache_key(path)
    deq = gg.default_cache(key["gguf_sha256"])
    assert json.loads((deq / gg.META).read_text()) == key
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    windows = make_windows(builtin_tokenizer(), TEXT, L)[:4]
    for lm in (first, second):
        assert lm.source == "gguf" and lm.identity["gguf_sha256"] == key["gguf_sha256"]
        assert bool(lm.model.config.tie_word_embeddings) is tied
        assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) is tied
        assert weights_sha256(lm.model) == weights_sha256(src)  # bit-exact float32 round trip
        assert lm.tokenizer(TEXT[:500])["input_ids"] == builtin_tokenizer()(TEXT[:500])["input_ids"]
        assert _ppl(lm.model, windows) == pytest.approx(_ppl(src, windows), rel=1e-6)


def test_gguf_keeps_the_bos_convention_through_the_cache(tmp_path, cache):
    src, bos_tok = tiny_llama(tied=False), builtin_tokenizer(add_bos=True)
    path = tmp_path / "bos.gguf"
    write_llama_gguf(src, bos_tok, path, add_bos=True)
    expected = prepare_data(bos_tok, "builtin", max_length=L, max_samples=3)
    assert expected.bos["prepended"] and bool((expected.eval_ids[:, 0] == 0).all())
    for _ in range(2):  # from the file, then from the cache
        lm = load_model(str(path), device="cpu")
        assert adds_bos(lm.tokenizer)
        data = prepare_data(lm.tokenizer, "builtin", max_length=L, max_samples=3)
        assert torch.equal(data.eval_ids, expected.eval_ids)
        assert _ppl(lm.model, data.eval_ids) == pytest.approx(_ppl(src, expected.eval_ids), rel=1e-6)
    assert len(cache) == 1


def test_gguf_cache_write_failure_warns_and_loads(tmp_path, cache, monkeypatch, caplog):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", refuse)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama(True), builtin_tokenizer(), path)
    with caplog.at_level(logging.WARNING, logger="esa"):
        lm = load_model(str(path), device="cpu")
    assert lm.source == "gguf" and "could not cache" in caplog.text and "disk full" in caplog.text
    deq = gg.default_cache(gg.cache_key(path)["gguf_sha256"])
    assert not deq.exists() and list(deq.parent.iterdir()) == []  # nothing partial left


def test_gguf_corrupt_cache_is_rebuilt(tmp_path, cache, caplog):
    src = tiny_llama(False)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(src, builtin_tokenizer(), path)
    load_model(str(path), device="cpu")
    deq = gg.default_cache(gg.cache_key(path)["gguf_sha256"])
    (deq / "model.safetensors").write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING, logger="esa"):
        lm = load_model(str(path), device="cpu")
    assert "unusable" in caplog.text and len(cache) == 2
    assert weights_sha256(lm.model) == weights_sha256(src)


def test_gguf_of_an_unknown_architecture_is_a_one_line_model_error(tmp_path, cache):
    path = tmp_path / "odd.gguf"
    write_llama_gguf(tiny_llama(True), builtin_tokenizer(), path, arch="no-such-arch")
    with pytest.raises(ModelError, match=r"cannot load odd\.gguf") as info:
        load_model(str(path), device="cpu")
    assert "\n" not in str(info.value)


def _cli_eval(capsys, model, *extra) -> dict:
    argv = ["eval", "--model", model, "--data-file", "builtin", "--max-length", "128", "--max-samples", "2"]
    capsys.readouterr()
    assert main([*argv, "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_eval_of_a_gguf_file(tmp_path, cache, capsys):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama(True), builtin_tokenizer(add_bos=True), path, add_bos=True)
    auto = _cli_eval(capsys, str(path))
    never = _cli_eval(capsys, str(path), "--bos", "never")
    assert auto["model"]["source"] == "gguf" and auto["bos"]["prepended"] and not never["bos"]["prepended"]
    assert auto["n_tokens"] == never["n_tokens"] == 2 * 127  # BOS is never a scored token
    assert auto["perplexity"] != never["perplexity"]
    assert len(cache) == 1


def test_local_dir_gives_the_gguf_paths_perplexity(tmp_path, capsys):
    """smollm2-135m through its GGUF (the embedded model) and the same weights saved as a local
    Hugging Face directory: the same perplexity on 2 x 128 windows."""
    lm = load_model("smollm2-135m", device="cpu")
    lm.model.save_pretrained(tmp_path / "smollm2")
    lm.tokenizer.save_pretrained(tmp_path / "smollm2")
    del lm
    via_gguf = _cli_eval(capsys, "smollm2-135m")
    via_dir = _cli_eval(capsys, str(tmp_path / "smollm2"))
    assert via_dir["model"]["source"] == "local" and via_gguf["model"]["source"] == "embedded"
    assert via_gguf["bos"] == via_dir["bos"] and not via_dir["bos"]["prepended"]
    assert via_dir["n_tokens"] == via_gguf["n_tokens"] == 2 * 127
    assert via_dir["perplexity"] == pytest.approx(via_gguf["perplexity"], rel=1e-6)


def test_random_llama_written_in_f16_loads_untied_and_rounded(tmp_path, cache):
    """The memory-run model (esa.bench.random_gguf): untied head, matrices rounded to float16."""
    from esa.bench.random_gguf import random_llama

    tok = builtin_tokenizer()
    src = random_llama(tok, hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, seed=1)
    path = tmp_path / "random.gguf"
    write_llama_gguf(src, tok, path, dtype="f16")
    assert not (tmp_path / "random.gguf.tmp").exists()
    got = load_model(str(path), device="cpu").model
    assert not got.config.tie_word_embeddings
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        want = src.get_parameter(name).detach().half().float()
        torch.testing.assert_close(got.get_parameter(name).detach(), want, rtol=0, atol=0)
