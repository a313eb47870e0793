"""The import structure keeps the layers that docs/architecture.md describes.

Why a test: a layer is broken by one import line, which no behaviour test notices (the
rate limit lived in jobs/ and block-copy imported it; the NBD client reached the server
through a function-local import). Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import collections
from dataclasses import dataclass
from pathlib import Path

import blockbackup

ROOT = Path(blockbackup.__file__).parent

#: block/ bottom up; a module imports (at run time) only from its own layer or below.
BLOCK_LAYERS: dict[str, int] = {
    # core: the driver interface, the request layer, option parsing, the data structures
    # they use, and the objects (throttle groups, TLS credentials) nodes refer to by id
    "driver": 1,
    "node": 1,
    "options": 1,
    "reqlist": 1,
    "bitmap": 1,
    "copy_range": 1,
    "sparse_write": 1,
    "ratelimit": 1,
    "throttle_groups": 1,
    "objects": 1,
    "permissions": 1,
    # features built on nodes
    "dirty_bitmap": 2,
    "bitmap_store": 2,
    "block_copy": 2,
    # drivers and filters
    "drivers": 3,
    "filters": 3,
    "qcow2": 3,
    # the graph: the one constructor, which knows every driver
    "graph": 4,
}

#: block-copy's modules bottom up (the package itself is the facade); a module imports only
#: from layers below its own, so the background pass and the guest path know nothing of
#: each other: what the background needs of guests is in the state.
BLOCK_COPY_LAYERS: dict[str, int] = {
    "block.block_copy.tunables": 0,
    "block.block_copy.state": 1,
    "block.block_copy.methods": 2,
    "block.block_copy.background": 3,
    "block.block_copy.guest": 3,
    "block.block_copy": 4,
}


@dataclass(frozen=True)
class Import:
    source: str  # module names without the "blockbackup." prefix
    target: str
    kind: str  # "top", "typing" (under TYPE_CHECKING) or "local" (inside a function)
    line: int
    commented: bool  # the line, or the one above it, says why it is lazy


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of a blockbackup module by a blockbackup module."""
    modules = _modules(root)
    found: list[Import] = []
    for name, path in modules.items():
        found += _imports_of(name, path.read_text(), modules)
    return found


def _imports_of(name: str, text: str, modules: dict[str, Path]) -> list[Import]:
    lines = text.splitlines()
    found: list[Import] = []

    def add(stmt: ast.stmt, target: str | None, kind: str) -> None:
        if target is None or target == name or not target.startswith("blockbackup"):
            return
        near = " ".join(lines[max(0, stmt.lineno - 3) : stmt.end_lineno or stmt.lineno])
        lazy = "lazy" in near.lower()
        found.append(Import(_short(name), _short(target), kind, stmt.lineno, lazy))

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, "typing")
                for stmt in child.orelse:
                    visit_stmt(stmt, kind)
            else:
                visit_stmt(child, kind)

    def visit_stmt(stmt: ast.AST, kind: str) -> None:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            visit(stmt, "local" if kind == "top" else kind)
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            for alias in stmt.names:
                add(stmt, _resolve(f"{stmt.module}.{alias.name}", modules), kind)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                add(stmt, _resolve(alias.name, modules), kind)
        else:
            visit(stmt, kind)

    visit(ast.parse(text), "top")
    return found


def _short(module: str) -> str:
    return module.removeprefix("blockbackup").removeprefix(".") or "blockbackup"


def _block_layer(module: str) -> int | None:
    if not module.startswith("block."):
        return None
    return BLOCK_LAYERS[module.split(".")[1]]


def _cycles(edges: list[tuple[str, str]]) -> list[set[str]]:
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


def test_every_block_module_has_a_layer() -> None:
    for module in _modules(ROOT):
        if module.startswith("blockbackup.block."):
            assert module.split(".")[2] in BLOCK_LAYERS, f"{module}: add it to a layer"


def test_block_imports_only_its_own_layer_or_below() -> None:
    upward = {
        (i.source, i.target)
        for i in imports()
        if i.kind != "typing"
        and (src := _block_layer(i.source)) is not None
        and (dst := _block_layer(i.target)) is not None
        and dst > src
    }
    assert not upward, upward


def test_block_has_no_import_cycle() -> None:
    edges = [
        (i.source, i.target)
        for i in imports()
        if i.kind != "typing" and i.source.startswith("block") and i.target.startswith("block")
    ]
    cycles = _cycles(edges)
    assert not cycles, cycles


def test_lower_layers_import_no_upper_package() -> None:
    """block/ knows nothing of jobs, QMP, the daemon or the NBD server; the NBD client side
    (protocol, client, TLS) knows nothing of the server side or of block/."""
    above_block = ("jobs", "qmp", "daemon", "api", "cli", "demo", "nbd.server", "nbd.exports")
    client_side = ("nbd.proto", "nbd.client", "nbd.tls")
    for i in imports():
        if i.source.startswith("block"):
            assert not i.target.startswith(above_block), i
        if i.source.startswith(client_side):
            assert not i.target.startswith(("block", "nbd.server", "nbd.exports", "nbd.rec")), i


def test_repository_imports_no_upper_package() -> None:
    """repository/ sits on block/ (its nodes are block drivers) and below everything that
    drives it: the QMP command that commits a live backup (qmp/commands/repository.py) and
    the CLI import it, never the other way round."""
    above = ("jobs", "qmp", "daemon", "api", "cli", "demo", "nbd")
    for i in imports():
        if i.source.startswith("repository"):
            assert not i.target.startswith(above), i


def test_no_function_local_import_hides_a_dependency() -> None:
    """A function-local import is kept only for start-up cost, and says so."""
    for i in imports():
        if i.kind == "local":
            assert i.commented, f"{i.source}:{i.line} imports {i.target} inside a function"


def test_block_copy_modules_import_only_lower_layers() -> None:
    """The engine split by concern stays layered: state, then the copy methods, then the
    background pass and the guest path side by side, then the facade; the rest of the
    code uses the facade only."""
    package = "block.block_copy"

    def within(module: str) -> bool:
        return module == package or module.startswith(package + ".")

    inner = {m for m in map(_short, _modules(ROOT)) if within(m)}
    assert inner == set(BLOCK_COPY_LAYERS), "add the module to BLOCK_COPY_LAYERS"
    for i in imports():
        if i.kind == "typing" or not within(i.target):
            continue
        if within(i.source):
            assert BLOCK_COPY_LAYERS[i.target] < BLOCK_COPY_LAYERS[i.source], i
        else:
            assert i.target == package, i
