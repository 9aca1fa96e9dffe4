"""The shape of the code base (issue 11, DESIGN.md): files a reader can hold, functions
that fit on a screen, the import direction between packages, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "protocol", "ml", "tui")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
#: Where functions are held to MAX_FUNCTION_LINES (argument parsers may be tables).
SHORT_FUNCTIONS = ("node", "protocol")
#: What each package may import of the others (DESIGN.md, "Import direction").
ALLOWED = {"protocol": set(), "ml": {"ml"}, "tui": {"tui"},
           "node": {"node", "protocol"}}
#: The command line wires the real learner in (node reaches ml only through a Protocol)
#: and starts the TUI (which never imports node).
WIRING = {"node.cli.main": {"ml", "tui"}}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Project modules ``path`` imports, except those imported for type checking only."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = set()
    package = module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    known = {module_name(p) for p in sources()}
    return {m for m in out if m in known}


def test_no_source_file_is_longer_than_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these by job: {long}"


def test_no_function_in_node_or_protocol_is_longer_than_60_lines():
    long = {}
    for path in sources():
        if not path.relative_to(ROOT).parts[0] in SHORT_FUNCTIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert not long, f"split these: {long}"


def test_packages_import_only_in_the_designed_direction():
    wrong = []
    for path in sources():
        name = module_name(path)
        own = name.split(".")[0]
        allowed = ALLOWED[own] | WIRING.get(name, set())
        for target in imports(path):
            if target.split(".")[0] not in allowed | {own}:
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


#: node/'s rooms, bottom up (docs/architecture.md): each imports only rooms below it.
NODE_LAYERS = [{"node.common", "node.config"}, {"node.trust"}, {"node.peers", "node.web"},
               {"node.runtime"}, {"node.cli"}]


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_node_rooms_import_only_the_rooms_below_them():
    level = {room: i for i, rooms in enumerate(NODE_LAYERS) for room in rooms}
    wrong = []
    for path in sources():
        name = module_name(path)
        if not name.startswith("node."):
            continue
        for target in imports(path):
            if target.startswith("node.") and _room(target) != _room(name) and (
                    level[_room(target)] >= level[_room(name)]):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_import_cycle_between_modules():
    graph = {module_name(p): imports(p) for p in sources()}
    # a package's __init__ is imported with its modules: not an edge of its own
    graph = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("check", [test_no_import_cycle_between_modules])
def test_the_cycle_check_can_fail(check, monkeypatch):
    """The cycle check finds a planted cycle (so a pass means something)."""
    real = imports

    def planted(path: Path) -> set[str]:
        out = real(path)
        if module_name(path) == "protocol.errors":
            out.add("protocol.envelope")  # envelope imports errors: a cycle
        return out

    monkeypatch.setitem(globals(), "imports", planted)
    with pytest.raises(AssertionError):
        check()
