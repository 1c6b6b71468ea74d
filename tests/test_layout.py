"""The shape of the code base, checked: what a newcomer can rely on when reading it.

- The runner stands alone on the Pi: it imports nothing from prepare/.
- No import cycles among the project's modules (prepare/, runner/, dodo.py, bench/ and the
  recipes' scripts), counting every import: at the top, inside a function, and by name
  (`importlib.import_module`, `__import__`); importing `a.b.c` from outside `a.b` also runs
  `a/__init__.py` and `a/b/__init__.py`, so it counts as importing those too.
- An import by name says what it imports (a string, or an f-string whose fixed start names
  the package: it counts as importing every module there), except where only optional
  third-party packages are imported by name (runner/packages.py).
- Project imports sit at the top of each file in prepare/, runner/ and dodo.py, not inside
  functions (bench/ and the recipes' scripts import some late, for their own reasons:
  optional peers, an artifacts directory fixed at import).
- Only prepare/families/ and prepare/evaluations/ (and prepare/family_facts.py) branch on a
  model family's name on the build side, and one registry does on the runner side.
- No module shadows a standard-library module.

`python -m tests.test_layout` prints the import graph (module -> the project modules it
imports), so anyone can see it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prepare", "runner")  # the shipped code: imports at the top, families named in one place
SCRIPTS = ("bench", "recipes")  # run as scripts; their imports count for cycles
FAMILY_NAMES = ("clip", "siglip", "gemma")
BY_NAME_ALLOWED = {ROOT / "runner" / "packages.py"}  # optional third-party packages, imported by name


def project_files(packages=PACKAGES + SCRIPTS) -> dict[str, Path]:
    """Module name -> file, for dodo.py and every module under `packages`. A recipe's script
    (recipes/demo-clip/train.py, no package) is named by its path: recipes.demo-clip.train."""
    files = {"dodo": ROOT / "dodo.py"}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _by_name(module: str, call: ast.Call) -> tuple[str | None, bool]:
    """For `importlib.import_module(X)` or `__import__(X)`: (the module name, or the fixed start
    of an f-string's name; whether the name is whole). (None, False): not an import by name."""
    f = call.func
    if not ((isinstance(f, ast.Attribute) and f.attr == "import_module") or
            (isinstance(f, ast.Name) and f.id in ("__import__", "import_module"))) or not call.args:
        return None, False
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, True
    prefix = ""
    for part in arg.values if isinstance(arg, ast.JoinedStr) else []:
        if isinstance(part, ast.Constant):
            prefix += part.value
        elif isinstance(part.value, ast.Name) and part.value.id == "__name__":
            prefix += module
        else:
            break
    return prefix, False


def imported(module: str, path: Path, node: ast.AST, known=()) -> list[str]:
    """The project modules an import statement or an import by name names (resolving relative
    imports; a recipe script's bare names are its sibling files). An import by name whose
    name is not fixed names every module of `known` under its fixed start, or "?" when that
    start names no project package."""
    siblings = module.rsplit(".", 1)[0] + "." if module.startswith(SCRIPTS[1] + ".") else None
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1] if node.level else []
        stem = ".".join(base + ([node.module] if node.module else []))
        # `from package import module` imports that module; `from module import name` the module.
        names = [f"{stem}.{a.name}" for a in node.names] + [stem]
    elif isinstance(node, ast.Call):
        name, whole = _by_name(module, node)
        if name is None:
            return []
        if whole:
            names = [name]
        elif name.split(".")[0] in PACKAGES + SCRIPTS:
            return [m for m in known if m.startswith(name)] or ["?"]
        elif name.split(".")[0] == "":
            return ["?"]
        else:
            return []  # a third-party package's modules (faker.providers.{kind})
    else:
        return []
    if siblings:
        names += [siblings + n for n in names if "." not in n]
    return [n for n in names if n.split(".")[0] in PACKAGES + SCRIPTS or (siblings and n.startswith(siblings))]


def with_packages(names: set[str], module: str, files: dict[str, Path]) -> set[str]:
    """`names` and the packages whose __init__ importing them runs first, but for the
    importing module's own packages (already being imported when it runs)."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts)):
            parent = ".".join(parts[:k])
            if parent in files and not (module + ".").startswith(parent + "."):
                out.add(parent)
    return out


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    graph = {}
    for module, path in files.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function bodies included
            names.update(imported(module, path, node, files))
        own = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}  # imported already
        graph[module] = {n for n in with_packages(names, module, files) if n in files and n != module and n not in own}
    return graph


def imports_by_unknown_name() -> list[str]:
    """Imports by a name this check cannot read: it cannot see what they import."""
    files, out = project_files(), []
    for module, path in files.items():
        if path in BY_NAME_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and "?" in imported(module, path, node, files):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


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
    assert {"bench.common", "recipes.demo-clip.train"} <= set(graph)  # and the benchmarks and recipes
    assert cycles(graph) == []


def test_imports_by_name_say_what_they_import():
    assert imports_by_unknown_name() == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_sees_late_imports_imports_by_name_and_packages(tmp_path):
    """Every way a module can import another, in a made-up package and a recipe script."""
    def edges(module: str, source: str, path: Path, files=()) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(source)):
            names.update(imported(module, path, node, files))
        return names

    inside = "def f():\n    from .b import x\n"
    assert edges("prepare.a", inside, tmp_path / "a.py") == {"prepare.b", "prepare.b.x"}
    by_name = "import importlib\ndef f(n):\n    return importlib.import_module(f'{__name__}.{n}')\n"
    assert edges("prepare.fam", by_name, tmp_path / "__init__.py", ["prepare.fam.x", "prepare.other"]) == {
        "prepare.fam.x"}
    assert edges("prepare.a", "__import__('prepare.b')", tmp_path / "a.py") == {"prepare.b"}
    assert edges("prepare.a", "import importlib\nimportlib.import_module(n)", tmp_path / "a.py") == {"?"}
    assert edges("recipes.demo.train", "def f():\n    import eval as e\n", tmp_path / "train.py") == {
        "recipes.demo.eval"}
    files = {"prepare.pkg": Path("__init__.py"), "prepare.pkg.sub": Path("sub.py")}
    assert with_packages({"prepare.pkg.sub"}, "prepare.recipe", files) == {"prepare.pkg.sub", "prepare.pkg"}
    assert with_packages({"prepare.pkg.sub"}, "prepare.pkg.other", files) == {"prepare.pkg.sub"}


def test_project_imports_are_at_the_top():
    inside = []
    files = project_files(PACKAGES)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(fn)
                           if set(imported(module, path, node, files)) - {"?"}]
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
    allowed = {ROOT / "prepare" / "families", ROOT / "prepare" / "evaluations", ROOT / "prepare" / "family_facts.py",
               ROOT / "runner" / "families.py",
               # the demo checkpoints' generator writes Hugging Face configs ("model_type": "clip")
               ROOT / "prepare" / "demo_models.py"}
    offenders = []
    for module, path in project_files(PACKAGES).items():
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
