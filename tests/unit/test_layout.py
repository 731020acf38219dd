"""The shape of the code, kept honest: every module of the package is in the development page's
layout (so it cannot go stale), no import cycle (imports inside functions included), and no
module past a size one reads in a sitting unless the page says why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "bridge"
DEVELOPMENT_PAGE = REPO / "docs" / "development.md"
MAX_LINES = 500
# Modules allowed past MAX_LINES, each with its reason in docs/development.md ("Layout").
LONG_MODULES = {"bridge/pop3/connection.py"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from bridge.x import y` may name the submodule bridge.x.y.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The check above can fail: two modules importing each other (one inside a function)."""
    (tmp_path / "a.py").write_text("from bridge.b import thing\n")
    (tmp_path / "b.py").write_text("def f():\n    from bridge.a import other\n")
    known = {"bridge.a", "bridge.b"}
    assert imports_of("bridge.a", tmp_path / "a.py", known) == {"bridge.b"}
    assert imports_of("bridge.b", tmp_path / "b.py", known) == {"bridge.a"}


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_is_in_the_development_layout(name: str) -> None:
    relative = modules()[name].relative_to(REPO).as_posix()
    if relative.endswith("__init__.py"):
        relative = relative.removesuffix("__init__.py")
    assert f"`{relative}`" in DEVELOPMENT_PAGE.read_text(), f"{relative} is missing from docs/development.md (Layout)"


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_short_enough_to_read_in_one_sitting(name: str) -> None:
    path = modules()[name]
    relative = path.relative_to(REPO).as_posix()
    lines = len(path.read_text().splitlines())
    if relative in LONG_MODULES:
        assert relative in DEVELOPMENT_PAGE.read_text()
        return
    assert lines <= MAX_LINES, f"{relative} has {lines} lines; split it (docs/development.md, Layout)"


SANS_IO = ["bridge.pop3", "bridge.imap.wire", "bridge.imap.untagged", "bridge.imap.listing", "bridge.imap.syntax",
           "bridge.imap.snapshot", "bridge.imap.limits", "bridge.imap.errors",
           "bridge.uidl.formats", "bridge.uidl.headers", "bridge.uidl.matching", "bridge.uidl.records"]
_IO_LIBRARIES = {"trio", "socket", "ssl", "asyncio", "selectors", "aioimaplib", "trio_asyncio"}


def _all_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", [n for n in sorted(modules()) if any(n == s or n.startswith(s + ".") for s in SANS_IO)])
def test_the_protocol_cores_do_no_io(name: str) -> None:
    """The POP3 core and the IMAP response layer are bytes in, events out: no network, no
    event loop (docs/development.md, "Dependency rules")."""
    imported = {module.split(".")[0] for module in _all_imports(modules()[name])}
    assert not imported & _IO_LIBRARIES, f"{name} imports {sorted(imported & _IO_LIBRARIES)}"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("bridge.ops.logs", {"bridge.ops.secrets"}),
        ("bridge.ops.metrics", set()),
        ("bridge.ops.secrets", set()),
        ("bridge.net.addresses", set()),
    ],
)
def test_leaf_modules_import_no_more_of_the_bridge(name: str, allowed: set[str]) -> None:
    """What everything imports must import (almost) nothing of the bridge itself."""
    ours = {module for module in _all_imports(modules()[name]) if module.split(".")[0] == "bridge"}
    assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"


def test_the_configuration_depends_on_nothing_that_reads_it() -> None:
    """config is read by everything; it may use only addresses, the secret-name rule and
    (inside validators) the TLS loaders."""
    allowed = {"bridge.net.addresses", "bridge.ops.secrets", "bridge.net.tls"}
    for name, path in modules().items():
        if name == "bridge.config" or name.startswith("bridge.config."):
            ours = {m for m in _all_imports(path) if m.split(".")[0] == "bridge" and not m.startswith("bridge.config")}
            assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"
