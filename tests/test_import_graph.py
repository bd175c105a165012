"""No import cycles anywhere in ``sla/``, function-local imports included.

A cycle hidden behind a function-local import works until someone moves that import to the top of its file, and
it makes the order in which modules may be imported a rule nobody wrote down. So the graph is read from the
source with :mod:`ast` (nothing is imported), with an edge ``A -> B`` for every import in ``A`` of ``B``, wherever
it sits: module level, inside a function, inside ``try``. Counted as well:

* ``importlib.import_module("constant", ...)``: an edge to the module it names;
* ``importlib.import_module(expression, ...)`` (how the lazy packages load their names): an edge to every module
  below the file's package that one of the file's string constants names (``".layers"``, ``"config"``,
  ``"sla.commands.demo"``), so the lazy tables count as imports. This over-counts, which can only report more
  cycles, never fewer.

A package with a module-level ``__getattr__`` (PEP 562; ``sla``, ``sla.training``, ...) is two nodes: ``P`` for
what its import runs, ``P:lazy`` for what its ``__getattr__`` imports on first use of a name. ``from P import n``
reaches ``P:lazy`` only when ``n`` is not bound at the top of ``P`` (``from sla import __version__`` does not load
the diffusers integration; ``from sla import apply_sla`` does); ``import P`` reaches both (any name may be used).

Not counted: imports under ``if TYPE_CHECKING:`` (they never run), and the implicit import of a module's parent
packages (every module of a package depends on its ``__init__``; that is how packages work, not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

SLA = Path(__file__).resolve().parent.parent / "sla"
LAZY = ":lazy"


def _module_paths() -> dict[str, Path]:
    names = {}
    for path in SLA.rglob("*.py"):
        parts = list(path.relative_to(SLA.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


class _Module:
    def __init__(self, name: str, path: Path):
        self.name = name
        self.is_package = path.name == "__init__.py"
        self.package = name if self.is_package else name.rpartition(".")[0]
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.lazy_getattr = next((n for n in self.tree.body if isinstance(n, ast.FunctionDef)
                                  and n.name == "__getattr__"), None)
        self.top_level_names = set()
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                self.top_level_names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                self.top_level_names.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.top_level_names.update((a.asname or a.name).split(".")[0] for a in node.names)


def _resolve(module: str | None, level: int, mod: _Module) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``mod``."""
    if level == 0:
        return module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _nodes_under(roots) -> set[int]:
    return {id(n) for root in roots for n in ast.walk(root)}


def _is_import_module_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module")


def import_graph() -> dict[str, set[str]]:
    """``{node: {nodes it imports}}`` over the modules of sla (package nodes with a lazy part split in two)."""
    modules = {name: _Module(name, path) for name, path in _module_paths().items()}

    def known(candidate: str) -> str | None:
        # the longest prefix of ``candidate`` that is a module of sla (``sla.x.y.func`` -> ``sla.x.y``)
        parts = candidate.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    def whole(target: str | None) -> set[str]:
        # importing a module object: any of its names may be used later, lazy ones included
        if target is None:
            return set()
        return {target, target + LAZY} if modules[target].lazy_getattr else {target}

    graph = {}
    for mod in modules.values():
        skipped = set()
        for node in ast.walk(mod.tree):
            test = getattr(node, "test", None)
            if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                skipped |= _nodes_under(node.body)
        in_getattr = _nodes_under([mod.lazy_getattr]) if mod.lazy_getattr else set()
        edges = {mod.name: set(), mod.name + LAZY: set()}
        dynamic = set()
        for node in ast.walk(mod.tree):
            if id(node) in skipped:
                continue
            owner = mod.name + LAZY if id(node) in in_getattr else mod.name
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "sla":
                        edges[owner] |= whole(known(alias.name))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, mod)
                if base.split(".")[0] != "sla":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges[owner] |= whole(sub)
                    elif base in modules and (alias.name in modules[base].top_level_names
                                              or not modules[base].lazy_getattr):
                        edges[owner].add(base)
                    else:
                        edges[owner] |= whole(known(base))
            elif _is_import_module_call(node) and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    target = f"{mod.package}.{arg.value.lstrip('.')}" if arg.value.startswith(".") else arg.value
                    edges[owner] |= whole(known(target))
                else:
                    dynamic.add(owner)
        for owner in dynamic:
            for node in ast.walk(mod.tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
                    s = node.value
                    target = s if s.startswith("sla.") else f"{mod.package}.{s.lstrip('.')}"
                    if target in modules and target.startswith(mod.package + "."):
                        edges[owner] |= whole(target)
        for node_name, targets in edges.items():
            if node_name.endswith(LAZY) and not mod.lazy_getattr:
                continue
            targets.discard(node_name)
            graph[node_name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if colour[child] == GREY:
                    path = [n for n, _ in stack]
                    return path[path.index(child):] + [child]
                if colour[child] == WHITE:
                    colour[child] = GREY
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                colour[node] = BLACK
                stack.pop()
    return None


def test_the_graph_sees_function_local_and_lazy_imports():
    graph = import_graph()
    # function-local: the CLI builds its parser from a table of module names
    assert "sla.commands.demo" in graph["sla.cli"]
    # the lazy tables of package __init__ files count as imports of the lazy node
    assert "sla.layers" in graph["sla" + LAZY] and "sla.training.trainer" in graph["sla.training" + LAZY]
    # the operator's interface reaches every backend
    assert {"sla.ops.sla.torch_impl", "sla.ops.sla.naive"} <= graph["sla.ops.sla.interface"]


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_sla():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
