"""The package layout is the architecture: layers import only downwards, no import cycles, no
module over 400 lines, no machine-specific absolute paths. See docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "esa"
MAX_LINES = 400

# bottom (0) to top (4); a module may import from its own layer or below, never above
LAYERS = {
    "esa.errors": 0,
    "esa.util": 0,
    "esa.models": 1,
    "esa.data": 2,
    "esa.evaluate": 2,
    "esa.metrics": 2,
    "esa.select": 2,
    "esa.select_frame": 2,
    "esa.eligibility": 2,
    "esa.perturb": 2,
    "esa.perturb_extra": 2,
    "esa.stats": 2,
    "esa.plots": 2,
    "esa.analyses": 3,
    "esa.runbook": 4,
    "esa.claims": 4,
    "esa.bench": 4,
    "esa.cli": 4,
    "esa.cli_cache": 4,
}
# where function-local esa imports are allowed: the pytest plugin and the CLI stay cheap to import
LAZY_OK = ("esa.claims", "esa.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> int | None:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def esa_imports(mod: str) -> list[tuple[str, bool]]:
    """(imported esa module, is function-local) for every import statement of `mod`."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        out += [(t, id(node) in local) for t in targets if t == "esa" or t.startswith("esa.")]
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in esa_imports(m) if t in MODULES and t != m} for m in MODULES}


def test_at_least_four_subpackages():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert len(subpackages) >= 4, subpackages


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    lines = len(MODULES[mod].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{mod} has {lines} lines (max {MAX_LINES}): split it by concept"


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "esa" and layer(m) is None] == []


def test_imports_point_downwards():
    upward = [
        (m, t)
        for m in MODULES
        if m != "esa"
        for t, _ in esa_imports(m)
        if t != "esa" and layer(t) is not None and layer(t) > layer(m)
    ]
    assert upward == [], "imports from a higher layer: " + ", ".join(f"{m} -> {t}" for m, t in upward)


def test_function_local_esa_imports_only_where_import_cost_matters():
    bad = [
        (m, t)
        for m in MODULES
        if not m.startswith(LAZY_OK) and m != "esa"
        for t, is_local in esa_imports(m)
        if is_local
    ]
    assert bad == [], "function-local esa imports: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [mod])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


ABSOLUTE = re.compile(r"""["'](/(?:work|home|root|Users|mnt|data|scratch)/[^"']*)["']""")


@pytest.mark.parametrize("folder", ["esa", "experiments", "tests", "fixtures"])
def test_no_machine_paths(folder):
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(1)}"
        for p in (ROOT / folder).rglob("*.py")
        if p.name != "test_architecture.py"
        for m in ABSOLUTE.finditer(p.read_text(encoding="utf-8"))
    ]
    assert hits == [], hits
