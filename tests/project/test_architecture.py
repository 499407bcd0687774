"""The rooms keep their imports: checked on the source, lazy and TYPE_CHECKING imports included.

Two rules: the layers point one way (`ALLOWED`), and every module imports
only what its row of the import table in docs/architecture.md allows.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
# Top to bottom.
PACKAGES = ("shell", "server", "spacer_core")
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


# --- the import table in docs/architecture.md ------------------------------------------------

# A row may name modules that are being added or renamed; it is then allowed to match none.
_MARKER = re.compile(r"\((planned|moving)\b")
_NAME = re.compile(r"`([A-Za-z_][\w.*]*)`")


@dataclass(frozen=True)
class Row:
    """One row of an import table: which modules it covers and what they may import."""

    line: int
    modules: tuple[str, ...]
    allows: tuple[str, ...]
    marked: bool

    def __str__(self) -> str:
        return f"row {', '.join(self.modules)} (docs/architecture.md line {self.line})"


def _matches(pattern: str, module: str) -> bool:
    # `x.*` covers the package x itself as well as everything under it.
    if pattern.endswith(".*") and module == pattern[:-2]:
        return True
    return fnmatch.fnmatchcase(module, pattern)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_rows(text: str) -> list[Row]:
    """Rows of every markdown table whose header has a `module(s)` and a `may import` column."""
    rows: list[Row] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        header = _cells(lines[index]) if lines[index].lstrip().startswith("|") else []
        lowered = [cell.lower() for cell in header]
        if not ("may import" in lowered and any(cell.startswith("module") for cell in lowered)):
            index += 1
            continue
        module_col = next(i for i, cell in enumerate(lowered) if cell.startswith("module"))
        allow_col = lowered.index("may import")
        index += 2  # the header and its |---| line
        while index < len(lines) and lines[index].lstrip().startswith("|"):
            cells = _cells(lines[index])
            if len(cells) != len(header):
                raise ValueError(
                    f"docs/architecture.md line {index + 1}: {len(cells)} cells, header has {len(header)}"
                )
            modules = tuple(_NAME.findall(cells[module_col]))
            if not modules:
                raise ValueError(f"docs/architecture.md line {index + 1}: no `module` in the module(s) cell")
            rows.append(
                Row(
                    line=index + 1,
                    modules=modules,
                    allows=tuple(_NAME.findall(cells[allow_col])),
                    marked=bool(_MARKER.search(cells[module_col])),
                )
            )
            index += 1
    return rows


def check_table(graph: dict[str, set[str]], rows: list[Row]) -> list[str]:
    """Every way `graph` (module -> the modules it imports) breaks the import table `rows`."""
    problems = []
    for row in rows:
        if row.marked:
            continue
        for pattern in row.modules:
            if not any(_matches(pattern, module) for module in graph):
                problems.append(
                    f"{row}: `{pattern}` matches no module (a typo, or a module that moved:"
                    " rename it, or mark the row (planned) or (moving))"
                )
    for module in sorted(graph):
        own = [row for row in rows if any(_matches(pattern, module) for pattern in row.modules)]
        if not own:
            problems.append(f"{module} has no row in the import table of docs/architecture.md: add one")
            continue
        if len(own) > 1:
            problems.append(f"{module} is matched by several rows: " + "; ".join(map(str, own)))
            continue
        row = own[0]
        for target in sorted(graph[module]):
            if target in _parents(module) or any(_matches(pattern, target) for pattern in row.allows):
                continue
            problems.append(f"{module} imports {target}, which its {row} does not allow")
    return problems


def test_every_module_imports_only_what_its_row_allows():
    rows = parse_rows(DOC.read_text())
    assert len(rows) > 20  # the tables were found
    problems = check_table(_graph(), rows)
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


_SAMPLE = """
| module(s) | holds | may import |
|---|---|---|
| `pkg`, `pkg.base` | the root | nothing |
| `pkg.rooms.*` | a room | `pkg.base`, `pkg.rooms.*` |
| `pkg.top` | the top | `pkg.rooms.*` (lazily) |
| `pkg.next` *(planned)* | to come | `pkg.top` |
"""


def test_table_rules_name_the_module_the_import_and_the_row():
    rows = parse_rows(_SAMPLE)
    assert [row.modules for row in rows] == [
        ("pkg", "pkg.base"),
        ("pkg.rooms.*",),
        ("pkg.top",),
        ("pkg.next",),
    ]
    assert rows[2].allows == ("pkg.rooms.*",) and rows[0].allows == () and rows[3].marked
    good = {
        "pkg": set(),
        "pkg.base": {"pkg"},
        "pkg.rooms": {"pkg.base"},
        "pkg.rooms.a": {"pkg.rooms", "pkg.rooms.b", "pkg.base"},
        "pkg.rooms.b": set(),
        "pkg.top": {"pkg.rooms.a"},
    }
    assert check_table(good, rows) == []
    upward = {**good, "pkg.rooms.b": {"pkg.top"}}
    assert check_table(upward, rows) == [
        "pkg.rooms.b imports pkg.top, which its row pkg.rooms.* (docs/architecture.md line 5) does not allow"
    ]
    unlisted = {**good, "pkg.extra": set()}
    assert check_table(unlisted, rows) == [
        "pkg.extra has no row in the import table of docs/architecture.md: add one"
    ]
    # An unmarked row that matches nothing is stale; a marked one may wait for its module.
    stale = {name: deps for name, deps in good.items() if name != "pkg.top"}
    assert [p.split(":")[0] for p in check_table(stale, rows)] == [
        "row pkg.top (docs/architecture.md line 6)"
    ]
    overlapping = parse_rows(_SAMPLE + "| `pkg.rooms.a` | again | nothing |\n")
    assert any("pkg.rooms.a is matched by several rows" in p for p in check_table(good, overlapping))
