"""No import cycle among the installed modules (docs/design.md: layers, with arrows one way).

Two graphs over every installed module (tests/installed.py: pkgutil over the installed package and
the kernels/, export/, bench/ folders pyproject maps into it). The import-time graph holds the
imports a module runs when it is imported: statements at module level, including those under
`if`/`try`/`with` and in class bodies, but not those inside functions (lazy) nor under
`if TYPE_CHECKING:`; a cycle there breaks `import` in some orders. The layer graph adds the lazy
imports: a cycle there is a layering knot that a lazy import only hides (cfgengine.runtime →
the ONNX Runtime backend → cfgengine.export.metadata → cfgengine.runtime was one).
Importing `a.b.c` also runs the packages `a` and `a.b`, so an edge goes to each of those that is
not already an ancestor of the importer (a module's own package is being imported when it runs)."""
from __future__ import annotations

import ast

import pytest

from tests import installed

MODULES = installed.modules()


def _statements(body: list[ast.stmt], lazy: bool = False):
    """The import statements that run when a module body runs (and in its functions if `lazy`)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _statements(node.orelse, lazy)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _statements(getattr(node, field, None) or [], lazy)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names one import statement in `module` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _edges(module: str, known: set[str], lazy: bool) -> set[str]:
    path = installed.source_file(module)
    tree = ast.parse(path.read_text(), str(path))
    ancestors = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
    targets = set()
    for node in _statements(tree.body, lazy):
        for name in _imported(node, module, path.name == "__init__.py"):
            parts = name.split(".")
            targets |= {".".join(parts[:i + 1]) for i in range(len(parts))}
    return {t for t in targets if t in known and t not in ancestors}


def graph(modules: list[str], lazy: bool = False) -> dict[str, set[str]]:
    """Each installed module → the installed modules importing it loads (or its functions may
    load, if `lazy`)."""
    known = set(modules)
    return {module: _edges(module, known, lazy) for module in modules}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `edges` as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_mapped_packages():
    for name in ("cfgengine.kernels", "cfgengine.export.onnx", "cfgengine.bench.harness",
                 "cfgengine.backends.onnxruntime", "cfgengine.precision"):
        assert name in MODULES


@pytest.mark.parametrize("lazy", [False, True], ids=["import-time", "with-lazy-imports"])
def test_installed_modules_have_no_import_cycle(lazy):
    cycle = find_cycle(graph(MODULES, lazy))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize("edges, acyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, True),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, False),
    ({"a": {"a"}}, False),
])
def test_the_cycle_finder(edges, acyclic):
    assert (find_cycle(edges) is None) == acyclic


def test_statements_at_import_time_and_lazy():
    """Module-level imports count at import time; an import inside a function only with lazy."""
    tree = ast.parse("from cfgengine.export.metadata import describe\nimport os\n"
                     "def lazy():\n    import cfgengine.sampler\n")
    names = [n for node in _statements(tree.body)
             for n in _imported(node, "cfgengine.backends.x", False)]
    assert "cfgengine.export.metadata" in names and "cfgengine.sampler" not in names
    lazy = [n for node in _statements(tree.body, lazy=True)
            for n in _imported(node, "cfgengine.backends.x", False)]
    assert "cfgengine.sampler" in lazy
