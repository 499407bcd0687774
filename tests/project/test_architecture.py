"""The layers point one way: checked on the source, lazy and TYPE_CHECKING imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("spacer_core", "server", "shell")
# What each layer may import from this repository (docs/architecture.md).
ALLOWED = {
    "spacer_core": {"spacer_core"},
    "server": {"server", "spacer_core"},
    "shell": {"shell", "server", "spacer_core"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Repository modules that `name` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    resolved = set()
    for target in targets:
        # `from pkg import mod` names a module; `from mod import func` names its module.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_layers_import_only_downwards():
    bad = []
    for module, imported in _graph().items():
        layer = module.split(".")[0]
        for target in imported:
            if target.split(".")[0] not in ALLOWED[layer]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    graph = {
        m: {t for t in ts if t.startswith(package)} for m, ts in _graph().items() if m.startswith(package)
    }
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    for module in graph:
        graph[module] -= set(_parents(module))
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
