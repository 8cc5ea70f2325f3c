"""The layout holds: packages by when their code runs, imports only going down, no import circles, the
bottom floors free of the heavy libraries, no private names imported across modules.

The floors, top to bottom (../shared/DESIGN.md, "Where things live"):
    cli, sanity            the commands
    launch, posttrain      the host, before, around and after the ranks
    train                  every rank
    checkpoint             both sides, around OUTPUT_DIR
    data                   both sides
    observe, plan          metrics and sinks; pure planning
    config, runtime        the spec; this process on this machine
    rundir, errors         every name under OUTPUT_DIR; SpecError
A module may import its own floor's packages and any floor below; imports inside functions count too
(they run back up just the same), `if TYPE_CHECKING:` blocks do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distsft"
FLOORS = [["cli", "sanity", "slurm"], ["launch", "posttrain"], ["train"], ["checkpoint"], ["data"],
          ["observe", "plan"], ["config", "runtime"], ["rundir", "errors"]]
FLOOR = {name: len(FLOORS) - i for i, names in enumerate(FLOORS) for name in names}
LIGHT = ("config", "plan", "runtime", "rundir", "errors")  # plan/render/--help stay fast
HEAVY = {"torch", "transformers", "trl", "datasets", "deepspeed", "peft", "bitsandbytes", "accelerate"}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top(module: str) -> str:
    """distsft.train.recipe -> train; distsft.errors -> errors; distsft -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, pkg: str | None = None) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, names, at module level, line) for every import outside `if TYPE_CHECKING:`;
    relative imports resolved against `pkg` (the file's package)."""
    tree = ast.parse(path.read_text())
    if pkg is None:
        pkg = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out: list[tuple[str, list[str], bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, [], top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                out.append((mod, [a.name for a in child.names], top, child.lineno))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return out


def _targets(mod: str, names: list[str]) -> list[str]:
    """The distsft modules an import statement reaches (`from distsft.x import y` may import module x.y)."""
    if mod == "distsft":
        return [f"distsft.{n}" for n in names]
    found = [f"{mod}.{n}" for n in names if (SRC.parent / f"{mod}.{n}".replace(".", "/")).with_suffix(".py").exists()
             or (SRC.parent / f"{mod}.{n}".replace(".", "/") / "__init__.py").exists()]
    return found or [mod]


MODULES = {_module(p): p for p in sorted(SRC.rglob("*.py"))}
EDGES = {m: sorted({t for mod, names, _, _ in _imports(p) if mod.startswith("distsft")
                    for t in _targets(mod, names) if t != m}) for m, p in MODULES.items()}


def test_every_package_has_a_floor():
    tops = {_top(m) for m in MODULES} - {""}
    assert tops <= set(FLOOR), f"packages without a floor in this test: {sorted(tops - set(FLOOR))}"


def test_imports_only_go_down():
    up = []
    for m, p in MODULES.items():
        if not _top(m):
            continue
        for mod, names, _, line in _imports(p):
            for t in _targets(mod, names) if mod.startswith("distsft") else []:
                if _top(t) and FLOOR[_top(t)] > FLOOR[_top(m)]:
                    up.append(f"{p.relative_to(SRC)}:{line} imports {t} (floor {_top(t)} is above {_top(m)})")
    assert not up, "imports running back up:\n" + "\n".join(up)


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in EDGES.get(v, []):
            if w not in MODULES:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            strong(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("package", LIGHT)
def test_bottom_floors_import_no_heavy_library_at_module_level(package):
    heavy = []
    for m, p in MODULES.items():
        if _top(m) != package:
            continue
        for mod, _, top, line in _imports(p):
            if top and mod.split(".")[0] in HEAVY:
                heavy.append(f"{p.relative_to(SRC)}:{line} imports {mod}")
    assert not heavy, "\n".join(heavy)


def test_no_private_name_is_imported_across_modules():
    private = []
    for m, p in MODULES.items():
        for mod, names, _, line in _imports(p):
            if mod.startswith("distsft") and mod != m:
                private += [f"{p.relative_to(SRC)}:{line} {mod}.{n}" for n in names if n.startswith("_")]
    assert not private, "\n".join(private)


def test_the_test_detects_an_upward_import(tmp_path):
    """The walk sees function-level imports and relative ones (what the rules above rely on)."""
    f = tmp_path / "mod.py"
    f.write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                 "def g():\n    from distsft.train import recipe\n    from ..train import model\n")
    found = [(mod, top) for mod, _, top, _ in _imports(f, pkg="distsft.plan") if mod.startswith(("distsft", "torch"))]
    assert found == [("distsft.train", False), ("distsft.train", False)]
