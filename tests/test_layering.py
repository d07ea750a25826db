"""The package's layering, read from the source: every import arrow points down
(helpers → ops → nn → models → integrations → kit → recipes → commands), there is no import cycle anywhere
in ``src/gspn`` (lazy imports inside functions included), recipes never import each other, and nothing
below ``commands`` parses arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layer of each part of the package, lowest first; a module may import its own layer and those below.
LAYERS: dict[str, int] = {
    "gspn._files": 0,
    "gspn._pickle": 0,
    "gspn._validate": 0,
    "gspn._images": 0,
    "gspn.ops": 1,
    "gspn.nn": 2,
    "gspn.models": 3,
    "gspn.integrations": 4,
    "gspn.datasets": 5,
    "gspn.training_utils": 5,
    "gspn.recipes": 6,
    "gspn.commands": 7,
    "gspn.__main__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "gspn").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The gspn modules an ``import``/``from ... import`` statement of ``module`` loads."""
    if node.level:
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if not base.startswith("gspn"):
        return []
    targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return targets or [base]


def _imports(module: str, path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, path, node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gspn"))
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    for prefix, rank in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "gspn" and _layer(m) is None] == []


def test_every_arrow_points_down():
    upward = [
        f"{m} → {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if t != "gspn" and m != "gspn" and _layer(t) > _layer(m)  # type: ignore[operator]
    ]
    assert upward == []


def test_no_import_cycle():
    """Tarjan's strongly connected components of the import graph: every one is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def test_recipes_never_import_each_other():
    recipes = {m.split(".")[2] for m in MODULES if m.startswith("gspn.recipes.")}
    crossing = [
        f"{m} → {t}"
        for m, targets in GRAPH.items()
        if m.startswith("gspn.recipes.")
        for t in targets
        if t.startswith("gspn.recipes.") and t.split(".")[2] != m.split(".")[2]
    ]
    assert recipes and crossing == []


@pytest.mark.parametrize(
    "module", [m for m in MODULES if _layer(m) is not None and _layer(m) < LAYERS["gspn.commands"]]
)
def test_nothing_below_commands_parses_arguments(module):
    tree = ast.parse(MODULES[module].read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "argparse" not in names
    code_names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    code_names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "Namespace" not in code_names  # no argparse.Namespace flows into library code


def test_one_console_script_and_no_module_spellings():
    """``gspn`` and ``python -m gspn`` are the only spellings of the command line."""
    text = (SRC.parent / "pyproject.toml").read_text()
    assert 'gspn = "gspn.commands:main"' in text
    mains = sorted(m for m in MODULES if m.endswith("__main__"))
    assert mains == ["gspn.__main__"]
    dunder = [m for m, p in MODULES.items() if m != "gspn.__main__" and 'if __name__ == "__main__"' in p.read_text()]
    assert dunder == []
