"""Every ``python esa_runner.py`` command of the research plan runs as ``esa run`` (issue 13).

The commands come from the research plan's markdown under ``../shared`` when it is there, else from
the verbatim copy ``tests/data/plan_commands.txt`` (29 commands, source named in its header). Each
runs with ``python esa_runner.py`` replaced by ``esa run``, the model swapped for the tiny model of
the same architecture, ``--max-samples 2`` (added where absent) and ``--max-length 16``; every other
option is kept as written, including ``--out-dir`` (relative: inside the test's directory) and its
absence (the generated default). Data: small WikiText-like files in a fake ``../shared/data``. The
PNG/PDF/SVG rendering is real for the first command with ``--save-plots`` and stubbed (an empty
file per figure) for the others, to keep the module near 60 s on one core.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import esa.plots
from esa.cli import main
from esa.models import load_model
from esa.models.archs import CONFIGS
from esa.models.registry import HUB_ALIASES
from esa.models.tokenizer import builtin_corpus

ROOT = Path(__file__).resolve().parents[1]
COPY = ROOT / "tests" / "data" / "plan_commands.txt"
SHARED = ROOT.parent / "shared"
PREFIX = "python esa_runner.py"
N_PLAN = 29
TINY = {  # the plan's hub models -> the tiny model of the same architecture (checked below)
    "meta-llama/Llama-3.1-8B": "tiny-llama",
    "mistralai/Mistral-7B-v0.3": "tiny-mistral",
    "microsoft/Phi-3-mini-4k-instruct": "tiny-phi3",
    "EleutherAI/pythia-1.4b": "tiny-pythia",
    "mistralai/Mixtral-8x7B-v0.1": "tiny-mixtral",
}
SMALL = {"--max-samples": "2", "--max-length": "16"}


def extract(markdown: str) -> list[str]:
    """Every ``python esa_runner.py ...`` line of ``markdown``, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", markdown)
    return [
        re.sub(r"\s+", " ", line.strip()) for line in text.splitlines() if line.strip().startswith(PREFIX)
    ]


def shared_commands() -> list[str]:
    """The commands of the research plan / runbook markdown under ../shared (none if absent)."""
    if not SHARED.is_dir():
        return []
    return [c for path in sorted(SHARED.glob("**/*.md")) for c in extract(path.read_text(encoding="utf-8"))]


def copied_commands() -> list[str]:
    lines = COPY.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


COMMANDS = shared_commands() or copied_commands()
FIRST_PLOTS = next(i for i, c in enumerate(COMMANDS) if "--save-plots" in c)


def esa_argv(command: str) -> list[str]:
    """``command`` as ``esa run`` argv: tiny model, small samples, every other option as written."""
    words = shlex.split(command)
    assert words[:2] == PREFIX.split(), command
    argv = ["run", *words[2:]]
    for i, word in enumerate(argv[:-1]):
        if word == "--model":
            argv[i + 1] = TINY[argv[i + 1]]
        if word in SMALL:
            argv[i + 1] = SMALL[word]
    argv += [x for flag, value in SMALL.items() if flag not in argv for x in (flag, value)]
    return [*argv, "--no-progress"]


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # shared: a repeated (model, metric, seed) hits it


@pytest.fixture
def project(tmp_path, monkeypatch, cache_dir):
    """A working directory beside a fake ../shared/data with small test / validation texts."""
    corpus = builtin_corpus()
    for rel, text in {
        "wikitext-2-raw/wiki.test.raw": corpus[:6_000],
        "wikitext-2/valid.txt": corpus[30_000:50_000],
    }.items():
        path = tmp_path / "shared" / "data" / rel
        path.parent.mkdir(parents=True)
        path.write_text(text, encoding="utf-8")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("ESA_CACHE_DIR", str(cache_dir))
    torch.set_num_threads(1)
    return tmp_path / "project"


def _stub_figures(monkeypatch) -> None:
    def save(fig, path, dpi=150, also=()):
        Path(path).write_bytes(b"")
        return Path(path)

    monkeypatch.setattr(esa.plots, "save_figure", save)


def test_the_copy_holds_the_plans_29_commands():
    copied = copied_commands()
    assert len(copied) == N_PLAN and all(c.startswith(PREFIX + " --model ") for c in copied)
    assert {shlex.split(c)[3] for c in copied} <= set(TINY)
    found = shared_commands()
    if found:  # the copy stays verbatim
        assert set(copied) <= set(found)


@pytest.mark.parametrize("hub", sorted(TINY))
def test_tiny_stand_in_has_the_same_architecture(hub):
    alias = {v: k for k, v in HUB_ALIASES.items()}[hub]
    assert type(load_model(TINY[hub]).model.config).__name__ == CONFIGS[alias][0]


@pytest.mark.parametrize(
    "index", range(len(COMMANDS)), ids=[f"plan{i + 1:02d}" for i in range(len(COMMANDS))]
)
def test_plan_command_runs(index, project, capsys, monkeypatch):
    argv = esa_argv(COMMANDS[index])
    if index != FIRST_PLOTS:
        _stub_figures(monkeypatch)
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    where = Path(re.search(r"artifacts in (.+)$", out.out.strip().splitlines()[-1]).group(1))
    given = option(argv, "--out-dir")
    if given is not None:
        assert where == (project / given).absolute()
    else:  # the generated default names what ran
        metric, mode, k = (
            option(argv, "--metric"),
            option(argv, "--mode", "per_layer"),
            option(argv, "--topk", "100"),
        )
        assert where.parent == (project / "outputs" / "esa" / option(argv, "--model")).absolute()
        assert where.name.startswith(f"{metric}_{mode}_k{k}_")
    seeds = [int(s) for s in option(argv, "--seeds", "0").split(",")]
    perturbations = option(argv, "--perturb", "sign_flip").split(",")
    controls = option(argv, "--controls", "random_k,bottom_k").split(",")
    results = json.loads((where / "results.json").read_text())
    assert len(results["rows"]) == len(seeds) * len(perturbations) * (1 + len(controls))
    assert all(r["restored_bit_exact"] for r in results["rows"])
    manifest = json.loads((where / "experiment_manifest.json").read_text())
    assert manifest["seeds"] == seeds and manifest["data"]["eval"]["windows_used"] == 2
    assert (where / "top_weights.csv").is_file()
    assert (where / "stability.json").is_file() == ("--stability-check" in argv)
    assert (where / "plots").is_dir() == ("--save-plots" in argv)
    if index == FIRST_PLOTS:
        assert all(p.stat().st_size > 0 for p in (where / "plots").glob("*.png"))
    wanted = {"--weight-analysis": "weight_analysis", "--architecture-analysis": "architecture"}
    if any(flag in argv for flag in wanted):
        analyses = json.loads((where / "analyses.json").read_text())
        assert {key for flag, key in wanted.items() if flag in argv} <= set(analyses)
