"""A model from a local Hugging Face directory (fixtures/pythia-style) and from a hub id.

fixtures/pythia-style is the trained scaling-family member neox-1055k written in Pythia's layout
by fixtures/export_pythia_style.py: CI runs the smoke claims on it with ``--esa-model
fixtures/pythia-style``. These tests check that the directory is what the script makes, that it
loads through the local-directory path (``AutoModelForCausalLM`` + ``AutoTokenizer``, no hub)
as the same model as the registered member, and that a hub id that cannot be had offline ends in
one line saying how to pre-download it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import normalizers

from esa.cli import main
from esa.data import prepare_data
from esa.errors import ModelError
from esa.evaluate import evaluate
from esa.models import check_model_name, load_model
from esa.models.load import check_hub_cache, hub_id
from esa.models.tokenizer import builtin_corpus
from esa.util.files import file_sha256

REPO = Path(__file__).resolve().parents[1]
DIRECTORY = REPO / "fixtures" / "pythia-style"
SCRIPT = REPO / "fixtures" / "export_pythia_style.py"
MEMBER = "scaling-neox-1055k"
PYTHIA = "EleutherAI/pythia-1.4b"
pytestmark = pytest.mark.skipif(
    not (DIRECTORY / "config.json").is_file(), reason="fixtures/pythia-style is absent"
)


def _script():
    spec = importlib.util.spec_from_file_location("export_pythia_style", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: HF_HUB_OFFLINE=1 and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_directory_holds_the_trained_member_in_pythias_layout():
    script = _script()
    assert sorted(p.name for p in DIRECTORY.iterdir()) == sorted(script.FILES)
    family = json.loads((REPO / "fixtures" / "scaling" / "family.json").read_text(encoding="utf-8"))
    member = next(m for m in family["models"] if m["name"] == "neox-1055k")
    assert file_sha256(DIRECTORY / "model.safetensors") == member["sha256"]  # trained, not random init
    config = json.loads((DIRECTORY / "config.json").read_text(encoding="utf-8"))
    tok_config = json.loads((DIRECTORY / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["architectures"]) == ("gpt_neox", ["GPTNeoXForCausalLM"])
    assert tok_config["tokenizer_class"] == "GPTNeoXTokenizer"  # what Pythia's tokenizer_config names


def test_export_script_reproduces_the_directory(tmp_path):
    script = _script()
    texts = [("built-in corpus", builtin_corpus()[:50_000])]
    out = script.export(tmp_path / "export", texts=texts)
    assert script.differences(out, DIRECTORY) == []
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())  # readable by others
    (out / "README.md").write_text("edited by hand\n", encoding="utf-8")
    assert script.differences(out, DIRECTORY) == ["README.md differs"]  # the comparison can fail


def test_tokenizer_mismatch_is_detected():
    script = _script()
    texts = [("built-in corpus", builtin_corpus()[:20_000])]
    assert script.tokenizer_mismatch(script.pythia_tokenizer(), texts) is None
    other = script.pythia_tokenizer()
    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert "ids differ" in script.tokenizer_mismatch(other, texts)


def test_loads_from_the_directory_offline_as_the_registered_member(offline):
    lm = load_model(str(DIRECTORY), dtype="fp32", device="cpu")
    ref = load_model(MEMBER, dtype="fp32", device="cpu")
    info = lm.describe()
    assert (info["source"], info["architecture"]) == ("local", "GPTNeoXForCausalLM")
    assert type(lm.tokenizer).__name__ == "GPTNeoXTokenizer"  # AutoTokenizer from the folder
    mine, theirs = lm.model.state_dict(), ref.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    a = prepare_data(lm.tokenizer, "builtin", max_length=64, max_samples=2)
    b = prepare_data(ref.tokenizer, "builtin", max_length=64, max_samples=2)
    assert not a.bos["prepended"]  # trained without BOS; the tokenizer adds none, as Pythia's
    assert torch.equal(a.eval_ids, b.eval_ids)
    ppl = evaluate(lm.model, a.eval_ids, progress=False).ppl
    assert ppl == evaluate(ref.model, b.eval_ids, progress=False).ppl


def test_relative_directory_name_resolves(monkeypatch):
    monkeypatch.chdir(REPO)
    check_model_name("fixtures/pythia-style")
    assert hub_id("fixtures/pythia-style") is None  # an existing folder wins over the hub


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (PYTHIA, PYTHIA),
        ("pythia-1.4b", PYTHIA),  # alias
        ("tiny-llama", None),  # registered
        ("model.gguf", None),
        ("a/b/c", None),
        ("./owner/name", None),
    ],
)
def test_hub_id(name, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert hub_id(name) == expected


def test_missing_local_folder_is_not_taken_for_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for call in (hub_id, check_model_name, load_model):
        with pytest.raises(ModelError, match="this is a local path, not a hub id"):
            call("models/pythia-1.4b")


@pytest.mark.parametrize("name", [PYTHIA, "pythia-1.4b"])
def test_hub_offline_error_is_one_line_saying_how_to_predownload(name, offline):
    with pytest.raises(ModelError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for part in (
        f"hf download {PYTHIA} --local-dir DIR",
        "huggingface-cli download",
        "--esa-model DIR",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        str(offline),  # the cache it looked in
    ):
        assert part in message, part


def test_hub_offline_error_through_the_cli(offline, capsys):
    assert main(["eval", "--model", "pythia-1.4b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"esa: error: cannot load '{PYTHIA}'") and "\n" not in err


def test_hub_id_in_the_cache_passes_offline(offline):
    """HF_HOME holding the model: offline, the check finds its config in the cache."""
    repo, commit = offline / "models--EleutherAI--pythia-1.4b", "0" * 40
    with pytest.raises(ModelError, match="does not hold it"):
        check_hub_cache(PYTHIA)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text((DIRECTORY / "config.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    check_hub_cache(PYTHIA)
