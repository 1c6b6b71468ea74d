"""The shape of the code base, checked: what a newcomer can rely on when reading it.

- The runner stands alone on the Pi: it imports nothing from prepare/.
- No import cycles among the project's modules (prepare/, runner/, dodo.py).
- Project imports sit at the top of each file, not inside functions.
- Only prepare/families/ branches on a model family's name on the build side, and one
  registry does on the runner side.
- No module shadows a standard-library module.

`python -m tests.test_layout` prints the import graph (module -> the project modules it
imports), so anyone can see it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prepare", "runner")
FAMILY_NAMES = ("clip", "gemma")


def project_files() -> dict[str, Path]:
    """Module name -> file, for dodo.py and every module of the project's packages."""
    files = {"dodo": ROOT / "dodo.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(module: str, path: Path, node: ast.AST) -> list[str]:
    """The project modules an import statement names (resolving relative imports)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1] if node.level else []
        stem = ".".join(base + ([node.module] if node.module else []))
        # `from package import module` imports that module; `from module import name` the module.
        names = [f"{stem}.{a.name}" for a in node.names] + [stem]
    else:
        return []
    return [n for n in names if n.split(".")[0] in PACKAGES]


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            edges |= {n for n in imported(module, path, node) if n in files and n != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_runner_does_not_import_prepare():
    graph = import_graph()
    offenders = [f"{m} -> {n}" for m, edges in graph.items() if m.startswith("runner") for n in edges
                 if n.startswith("prepare")]
    assert not offenders
    assert sum(m.startswith("runner") for m in graph) >= 5  # the scan saw the runner's files


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and sum(len(e) for e in graph.values()) > 50  # the scan saw the imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_project_imports_are_at_the_top():
    inside = []
    for module, path in project_files().items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(fn)
                           if imported(module, path, node)]
    assert not inside


def family_names_used(path: Path, branches_only: bool = False) -> list[str]:
    """Places in a file that name a family as a string; with `branches_only`, only those that
    branch on it (a comparison, a dict key): the runner's commands are named after families."""
    tree = ast.parse(path.read_text(), str(path))
    if branches_only:
        nodes = [c for n in ast.walk(tree) if isinstance(n, ast.Compare) for c in (n.left, *n.comparators)]
        nodes += [k for n in ast.walk(tree) if isinstance(n, ast.Dict) for k in n.keys if k is not None]
    else:
        nodes = list(ast.walk(tree))
    return [f"{path.relative_to(ROOT)}:{n.lineno} {n.value!r}" for n in nodes
            if isinstance(n, ast.Constant) and n.value in FAMILY_NAMES]


def test_only_the_family_registries_name_families():
    allowed = {ROOT / "prepare" / "families", ROOT / "runner" / "families.py",
               # the demo checkpoints' generator writes Hugging Face configs ("model_type": "clip")
               ROOT / "prepare" / "demo_models.py"}
    offenders = []
    for module, path in project_files().items():
        if not any(path == a or a in path.parents for a in allowed):
            offenders += family_names_used(path, branches_only=module.startswith("runner"))
    assert not offenders
    assert family_names_used(ROOT / "prepare" / "families" / "__init__.py")  # the check does see names


def test_no_module_shadows_the_standard_library():
    stdlib = sys.stdlib_module_names
    shadows = [str(p.relative_to(ROOT)) for p in project_files().values() if p.stem in stdlib]
    assert not shadows


if __name__ == "__main__":
    for module, edges in sorted(import_graph().items()):
        print(f"{module} -> {', '.join(sorted(edges)) or '-'}")
    print(f"cycles: {cycles(import_graph()) or 'none'}")
